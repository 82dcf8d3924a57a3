"""Long-lived rank pools: N forkserver processes per (world size, backend), reused across tests.

A pool is trusted only while every test on it passes. Any failure (an exception on some ranks, a
dead rank, a timeout) may leave collectives unmatched, so the pool is killed, reaped and replaced
by a fresh one on the next test. Starting a pool costs ~0.1-0.3 s once the forkserver is up.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from dtdispatch.testing import _worker

# Imported once in the forkserver, so each rank starts in ~0.03 s instead of ~0.6 s
# (ARCHITECTURE "The test harness").
# torch._dynamo: DTensor's first distribute_tensor imports it lazily (~1.5 s per rank otherwise).
PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch._dynamo",
           "dtdispatch", "dtdispatch.testing._worker"]
START_TIMEOUT_S = 120.0  # first start imports torch in the forkserver: seconds on a loaded machine
GRACE_S = 2.0  # after the first failure, how long the other ranks may take to report theirs
STACK_DUMP_WAIT_S = 0.3


class PoolError(Exception):
    """A pool could not start; the message says why."""


def _describe_exit(rank: int, exitcode: int | None) -> str:
    if exitcode is None:
        return f"rank {rank} died (exit status unknown)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        return f"rank {rank} killed by signal {name}"
    return f"rank {rank} exited with code {exitcode}"


class RankPool:
    """``world_size`` live ranks with the default process group initialized (``backend``)."""

    def __init__(self, world_size: int, backend: str) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        self.world_size = world_size
        self.backend = backend
        # A private directory per pool: the FileStore rendezvous cannot collide with another pool,
        # another xdist worker or another session.
        self._dir = tempfile.mkdtemp(prefix=f"dtdispatch-pool{world_size}-")
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self.pids: list[int] = []  # of the ranks
        self.forkserver_pid = 0  # the ranks' parent, shared by all pools; exits with this process
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=_worker.main,
                args=(rank, world_size, backend, os.path.join(self._dir, "store"),
                      self._stack_path(rank), child_end),
                name=f"dtdispatch-rank{rank}-of-{world_size}",
                daemon=True,  # multiprocessing kills it at interpreter exit as a last resort
            )
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)
            assert proc.pid is not None  # started
            self.pids.append(proc.pid)
        try:
            self._await_ready()
        except BaseException:
            self.kill()
            raise

    def _stack_path(self, rank: int) -> str:
        return os.path.join(self._dir, f"rank{rank}.stack")

    def _await_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for rank, conn in enumerate(self._conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise PoolError(f"rank {rank} of {self.world_size} did not start within "
                                f"{START_TIMEOUT_S:.0f} s")
            try:
                msg = conn.recv()
            except EOFError:
                self._procs[rank].join(5)
                raise PoolError("pool start failed: "
                                + _describe_exit(rank, self._procs[rank].exitcode)) from None
            if msg[0] != "ready":
                raise PoolError(f"rank {rank} could not join the process group:\n{msg[2]}")
            self.forkserver_pid = msg[2]

    def healthy(self) -> bool:
        """Cheap check between tests: every rank alive and its pipe open and idle."""
        return all(p.is_alive() for p in self._procs) and not any(
            c.closed or c.poll() for c in self._conns
        )

    def run(self, job: _worker.Job, timeout: float) -> tuple[str, str]:
        """Run ``job`` on every rank: ("passed", ""), ("skipped", reason) or ("failed", report).

        A test is skipped when no rank failed and at least one called ``pytest.skip``.
        On failure the pool is killed before returning; callers must drop it.
        Output the ranks printed is written to this process's stdout, prefixed by rank.
        """
        for conn in self._conns:
            try:
                conn.send(job)
            except OSError:  # the rank just died: the wait below reports how
                pass
        pending = set(range(self.world_size))
        reports: list[str] = []  # in order of arrival: the first one is the likely cause
        outputs: dict[int, str] = {}
        skip_reasons: list[str] = []
        start = time.monotonic()
        first_failure: float | None = None
        while pending:
            limit = start + timeout
            if first_failure is not None:
                limit = min(limit, first_failure + GRACE_S)
            remaining = limit - time.monotonic()
            if remaining <= 0:
                break
            waitables: dict[Any, int] = {self._conns[r]: r for r in pending}
            waitables.update({self._procs[r].sentinel: r for r in pending})
            for ready in wait(list(waitables), remaining):
                rank = waitables[ready]
                if rank not in pending:
                    continue
                msg = self._receive(rank)
                pending.discard(rank)
                if msg is not None and msg[0] in ("ok", "skip"):
                    outputs[rank] = msg[1]
                    skip_reasons.extend(msg[2:])
                    continue
                if msg is None:
                    self._procs[rank].join(5)
                    reports.append(_describe_exit(rank, self._procs[rank].exitcode))
                else:
                    outputs[rank] = msg[1]
                    reports.append(f"rank {rank} failed:\n{msg[2]}")
                if first_failure is None:
                    first_failure = time.monotonic()
        for rank in sorted(outputs):
            for line in outputs[rank].splitlines():
                print(f"[rank {rank}] {line}")
        if not reports and not pending:
            return ("skipped", skip_reasons[0]) if skip_reasons else ("passed", "")
        if pending:
            ranks = ", ".join(map(str, sorted(pending)))
            if first_failure is None:
                reports.append(f"timed out after {timeout:g} s: rank(s) {ranks} did not finish")
            else:
                reports.append(f"rank(s) {ranks} did not finish within {GRACE_S:g} s of the "
                               "first failure (probably waiting in a collective); killed")
            reports.extend(self._stacks(sorted(pending)))
        self.kill()
        head = f"distributed test failed (world size {self.world_size}, {self.backend})"
        if len(reports) > 1:
            head += "; the first report is the likely cause, later ones may be consequences"
        return "failed", head + "\n\n" + "\n\n".join(r.rstrip() for r in reports)

    def _receive(self, rank: int) -> tuple[Any, ...] | None:
        """The rank's reply, or None if it died (its pipe closed or its process ended)."""
        conn = self._conns[rank]
        try:
            if conn.poll():
                reply: tuple[Any, ...] = conn.recv()
                return reply
        except (EOFError, OSError):
            pass
        return None

    def _stacks(self, ranks: list[int]) -> list[str]:
        """Python stacks of hung ranks, dumped by faulthandler on SIGUSR1."""
        for rank in ranks:
            try:
                os.kill(self._procs[rank].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        time.sleep(STACK_DUMP_WAIT_S)
        stacks = []
        for rank in ranks:
            with open(self._stack_path(rank)) as f:
                dump = f.read().strip()
            if dump:
                stacks.append(f"rank {rank} was here when killed:\n{dump}")
        return stacks

    def shutdown(self) -> None:
        """Ask every rank to exit, then kill what is left; idempotent."""
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """SIGKILL every rank, reap it and remove the rendezvous directory; idempotent."""
        for proc in self._procs:
            if proc.exitcode is None:
                proc.kill()
        for proc in self._procs:
            proc.join(10)
        for conn in self._conns:
            conn.close()
        shutil.rmtree(self._dir, ignore_errors=True)
