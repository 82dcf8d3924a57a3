"""The rank process of a pool: joins the default process group once, then runs test jobs.

Protocol over the rank's pipe (parent -> rank): ``Job`` to run a test body, ``None`` to exit.
Replies (rank -> parent): ``("ready", pid, ppid)`` once the group is up, then per job
``("ok", output)``, ``("skip", output, reason)`` (``pytest.skip`` in the body) or
``("error", output, traceback)``. Anything else (EOF, a signal) means the rank died.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import faulthandler
import importlib.util
import io
import os
import signal
import sys
import traceback
import types
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import pytest


@dataclass(frozen=True)
class Job:
    """One distributed test body: where it lives, and its arguments besides rank/world_size."""

    module_name: str
    module_file: str
    function_name: str
    kwargs: dict[str, Any]
    sys_path: list[str]


def main(
    rank: int, world_size: int, backend: str, store_path: str, stack_path: str, conn: Connection
) -> None:
    """Entry point of one rank (the target of a forkserver ``Process``)."""
    if sys.platform == "linux":
        # Die with the forkserver (which exits with pytest), even if stuck in a collective.
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 == PR_SET_PDEATHSIG
    # The parent sends SIGUSR1 to a rank that timed out, to show where it is stuck.
    stack_file = open(stack_path, "w")  # kept open for the life of the rank
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.FileStore(store_path, world_size)  # type: ignore[attr-defined]
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    except BaseException:
        conn.send(("error", "", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid(), os.getppid()))

    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent went away
            return
        if job is None:
            return
        conn.send(_run(job, rank, world_size))
        if not dist.is_initialized():
            return  # the test destroyed the group: this pool is unusable; the parent restarts it


def _run(job: Job, rank: int, world_size: int) -> tuple[str, ...]:
    """Run one job, capturing Python-level output; never raises."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            fn = getattr(_import_test_module(job), job.function_name)
            fn(rank=rank, world_size=world_size, **job.kwargs)
    except pytest.skip.Exception as e:
        return ("skip", out.getvalue(), str(e.msg))
    except BaseException as e:
        # Drop this frame so the traceback starts at the test body.
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        return ("error", out.getvalue(), "".join(traceback.format_exception(type(e), e, tb)))
    return ("ok", out.getvalue())


def _import_test_module(job: Job) -> types.ModuleType:
    """Import the test module the way pytest did in the parent, with pytest's assert rewriting.

    Rewriting makes ``assert a == b`` failures show the values, as in a single-process test.
    """
    mod = sys.modules.get(job.module_name)
    if mod is not None and getattr(mod, "__file__", None) == job.module_file:
        return mod
    for entry in reversed(job.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    spec = importlib.util.spec_from_file_location(job.module_name, job.module_file)
    if spec is None:
        raise ImportError(f"cannot import test module {job.module_name} from {job.module_file}")
    mod = importlib.util.module_from_spec(spec)
    with open(job.module_file, "rb") as f:
        source = f.read()
    tree = ast.parse(source, filename=job.module_file)
    # Private, but stable since pytest 3.
    from _pytest.assertion.rewrite import rewrite_asserts

    rewrite_asserts(tree, source, job.module_file, None)
    code = compile(tree, job.module_file, "exec", dont_inherit=True)
    sys.modules[job.module_name] = mod
    try:
        exec(code, mod.__dict__)
    except BaseException:
        del sys.modules[job.module_name]
        raise
    return mod
