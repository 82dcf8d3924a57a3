"""The launch scripts under real launchers: torchrun at 1, 2 and 4 CPU ranks, mpiexec at 2."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "launch" / "smoke.py")
OUTER_TIMEOUT_S = 240


def _mpiexec() -> str | None:
    """The mpiexec of this environment (the mpich wheel puts it next to python), else PATH's."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run a launcher in its own session; on timeout, stop it and everything it started."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **env}, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        out, _ = proc.communicate(timeout=OUTER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun and mpiexec stop their workers on SIGTERM
        try:
            proc.communicate(timeout=10)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{cmd} did not finish within {OUTER_TIMEOUT_S} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _torchrun(n: int, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={n}", SMOKE]
    return _run(cmd, **env)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_torchrun_smoke(n: int) -> None:
    result = _torchrun(n)
    assert result.returncode == 0, result.stdout
    meshes = "1d,2d" if n == 4 else "1d"
    assert f"smoke PASS: world_size={n} launcher=torchrun backend=gloo meshes={meshes}," \
        in result.stdout
    for rank in range(n):
        assert f"smoke rank {rank}/{n} [torchrun gloo cpu]:" in result.stdout
    assert result.stdout.count(", ok") == n


def test_torchrun_smoke_fails_on_a_wrong_result() -> None:
    result = _torchrun(2, DTDISPATCH_SMOKE_INJECT_FAILURE="1")
    assert result.returncode != 0
    assert "smoke rank 1/2 [torchrun gloo cpu]: 10 checks, FAILED ['1d add']" in result.stdout
    assert "smoke FAIL: world_size=2" in result.stdout and "failures=1" in result.stdout


@pytest.mark.skipif(_mpiexec() is None, reason="no mpiexec (pip install -e '.[mpi]')")
def test_mpiexec_smoke() -> None:
    pytest.importorskip("mpi4py")
    result = _run([str(_mpiexec()), "-n", "2", sys.executable, SMOKE])
    assert result.returncode == 0, result.stdout
    assert "smoke PASS: world_size=2 launcher=mpi backend=gloo meshes=1d,sub[0]" in result.stdout
    assert "smoke rank 1/2 [mpi gloo cpu]: 10 checks, ok" in result.stdout
