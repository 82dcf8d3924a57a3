"""The harness from the outside: inner pytest sessions (pytester, in subprocesses) with tests that
must fail, and checks on how they fail, how fast, and that no process outlives them."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

FAILING_TESTS = """
    import os, signal, time
    import pytest
    import torch
    import torch.distributed as dist

    def record(rank):
        with open(os.environ["PIDFILE"], "a") as f:
            f.write(f"{os.getpid()} {os.getppid()}\\n")

    @pytest.mark.distributed(world_size=2)
    def test_warm_up(rank, world_size):  # starts the forkserver, so durations below exclude it
        record(rank)
        assert world_size == 2

    @pytest.mark.distributed(world_size=2, timeout=30)
    def test_assert_on_rank1(rank, world_size):
        record(rank)
        print(f"hello from rank {rank}")
        assert rank != 1, "rank one disagrees"

    @pytest.mark.distributed(world_size=2)
    def test_peer_stuck_in_collective(rank, world_size):
        if rank == 1:
            raise RuntimeError("rank 1 gives up")
        dist.barrier()  # never matched: rank 1 is gone

    @pytest.mark.distributed(world_size=2, timeout=30)
    def test_exit_3(rank, world_size):
        record(rank)
        if rank == 0:
            os._exit(3)
        dist.barrier()

    @pytest.mark.distributed(world_size=2, timeout=30)
    def test_segfault(rank, world_size):
        if rank == 1:
            os.kill(os.getpid(), signal.SIGSEGV)
        dist.barrier()

    @pytest.mark.distributed(world_size=2)
    def test_hang_default_timeout(rank, world_size):
        record(rank)
        if rank == 1:
            time.sleep(600)

    @pytest.mark.distributed(world_size=2, timeout=3)
    def test_hang_marker_timeout(rank, world_size):
        if rank == 0:
            dist.barrier()

    def test_crashed_ranks_were_reaped():
        with open(os.environ["PIDFILE"]) as f:
            pids = {int(line.split()[0]) for line in f}
        assert len(pids) == 6  # three pools of two ranks, each killed after its failure
        assert [p for p in pids if os.path.exists(f"/proc/{p}")] == []

    @pytest.mark.distributed(world_size=2)
    def test_pool_recovers(rank, world_size):
        record(rank)
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == 2

    def test_rank_fixture_outside_distributed(rank):
        pass

    @pytest.mark.distributed(world_size=2)
    def test_other_fixtures_refused(rank, world_size, tmp_path):
        pass
"""


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: it only waits for a parent that may be PID 1 to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return "(gone)"


def _durations(stdout: str) -> dict[str, float]:
    return {m[2]: float(m[1]) for m in re.finditer(r"([\d.]+)s call\s+\S+::(\w+)", stdout)}


def test_failures_name_the_rank_fail_fast_and_leave_no_process(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = tmp_path / "pids"
    monkeypatch.setenv("PIDFILE", str(pidfile))
    monkeypatch.setenv("DTDISPATCH_TEST_TIMEOUT", "2")
    pytester.makepyfile(test_failing=textwrap.dedent(FAILING_TESTS))
    start = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--durations=0", "-vv")
    elapsed = time.monotonic() - start
    out = result.stdout.str()
    result.assert_outcomes(passed=3, failed=7, errors=1)

    # The assertion on rank 1: named, with its traceback and message; rank 0 passed.
    section = out.split("test_assert_on_rank1 _")[1].split("\n____")[0]
    assert "rank 1 failed:" in section and "rank 0 failed" not in section
    assert "AssertionError: rank one disagrees" in section and "assert 1 != 1" in section
    assert "[rank 1] hello from rank 1" in out  # what the ranks print is shown
    # A rank that raised while its peer waits: the peer is killed after the grace period.
    section = out.split("test_peer_stuck_in_collective _")[1].split("\n____")[0]
    assert "rank 1 failed:" in section and "RuntimeError: rank 1 gives up" in section
    assert "rank(s) 0 did not finish within 2 s of the first failure" in section
    # Crashes: exit code and signal, reported per rank.
    assert "rank 0 exited with code 3" in out
    assert "rank 1 killed by signal SIGSEGV" in out
    # Hangs: the env default (2 s) and the marker (3 s), naming the ranks and where they were.
    assert "timed out after 2 s: rank(s) 1 did not finish" in out
    assert "timed out after 3 s: rank(s) 0 did not finish" in out
    assert re.search(r"rank 1 was here when killed:.*in test_hang_default_timeout", out, re.S)
    # Misuse is explained.
    assert "the 'rank' fixture only exists in tests marked @pytest.mark.distributed" in out
    assert "distributed test argument 'tmp_path'" in out

    durations = _durations(out)
    for name in ("test_exit_3", "test_segfault", "test_assert_on_rank1"):
        assert durations[name] < 10, (name, durations[name])  # far below their 30 s timeout
    assert 2 <= durations["test_hang_default_timeout"] < 2 + 10
    assert elapsed < 120

    # Nothing outlives the session: neither the ranks nor the forkserver that forked them.
    pids = {int(p) for line in pidfile.read_text().splitlines() for p in line.split()}
    assert len(pids) == 8 + 1  # 8 ranks (4 pools of 2, the last one healthy) and one forkserver
    assert {p: _cmdline(p) for p in pids if _alive(p)} == {}


def test_skip_in_the_body_skips_and_keeps_the_pool(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import torch
        import torch.distributed as dist

        @pytest.mark.distributed(world_size=2)
        def test_skip(rank, world_size):
            dist.barrier()  # every rank gets here, then all skip
            pytest.skip("skipped on every rank")

        @pytest.mark.distributed(world_size=2)
        def test_after(rank, world_size):
            t = torch.ones(1)
            dist.all_reduce(t)
            assert t.item() == 2
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", "-v")
    result.assert_outcomes(passed=1, skipped=1)
    assert "skipped on every rank" in result.stdout.str()


def test_bad_marker_arguments_raise_value_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.distributed(world_size=0)
        def test_zero(rank, world_size): pass

        @pytest.mark.distributed(world_size=2, timeout=-1)
        def test_timeout(rank, world_size): pass

        @pytest.mark.distributed(world_size=2, backend="mpi")
        def test_backend(rank, world_size): pass

        @pytest.mark.distributed(world_size=2, device="cuda", backend="gloo")
        def test_contradiction(rank, world_size): pass

        @pytest.mark.distributed(world_size=2, ranks=3)
        def test_unknown(rank, world_size): pass

        @pytest.mark.distributed(world_size=2, backend="nccl")
        def test_needs_gpus(rank, world_size): pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    out = result.stdout.str()
    if "needs 2 GPU(s) for nccl" in out:
        result.assert_outcomes(errors=5, skipped=1)
    else:  # a machine with 2+ GPUs
        result.assert_outcomes(errors=5, passed=1)
    assert "ValueError: distributed world_size must be an int >= 1, got 0" in out
    assert "ValueError: timeout must be a positive number of seconds, got -1" in out
    assert "ValueError: distributed backend must be 'auto', 'gloo' or 'nccl', got 'mpi'" in out
    assert "ValueError: distributed device='cuda' contradicts backend='gloo'" in out
    assert "ValueError: unknown distributed marker argument(s): ['ranks']" in out


def test_xdist_workers_do_not_collide(pytester: pytest.Pytester) -> None:
    """Two xdist workers, each with its own pools at the same world size, at the same time."""
    pytester.makepyfile(
        """
        import pytest, torch, torch.distributed as dist

        @pytest.mark.distributed(world_size=2)
        @pytest.mark.parametrize("i", range(6))
        def test_sum(rank, world_size, i):
            t = torch.tensor([rank + i])
            dist.all_reduce(t)
            assert t.item() == 1 + 2 * i
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=6)
    assert "2 workers" in result.stdout.str()
