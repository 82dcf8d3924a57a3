"""The exit-time writer behind ``DTDISPATCH_TELEMETRY=DIR`` (the merge is ``dtdispatch.telemetry``).

Armed at import by ``dtdispatch/__init__.py``; the process writes ``dtdispatch.stats()`` plus rank,
world size, pid, host, torch version and implementation to
``DIR/dtdispatch-rank{R}-of-{W}-pid{PID}.json`` when it exits normally (``atexit``). Rank and world
size: see ``dtdispatch.telemetry``.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "ENV",
    "FORMAT",
    "PATTERN",
    "disarm",
    "install_from_env",
    "note_process_group",
    "record",
    "write",
]

ENV = "DTDISPATCH_TELEMETRY"
FORMAT = "dtdispatch-telemetry/1"
PATTERN = "dtdispatch-rank*-of-*-pid*.json"
_ENV_RANKS = (
    ("RANK", "WORLD_SIZE", "env RANK/WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "env PMI_RANK/PMI_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "env OMPI_COMM_WORLD_RANK/SIZE"),
)
# Rank and world size of the default process group, last seen while it was initialized.
_seen: list[tuple[int, int]] = []
# The directory this process writes to at exit; emptied by the merge CLI (it must not add itself).
_target: list[Path] = []


def note_process_group() -> None:
    """Remember the default process group's rank and world size (called by ``accelerate``)."""
    if dist.is_available() and dist.is_initialized():
        _seen[:] = [(dist.get_rank(), dist.get_world_size())]


def _rank_and_world() -> tuple[int, int, str]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), "process group at exit"
    if _seen:
        return _seen[0][0], _seen[0][1], "process group seen by accelerate"
    for rank_var, size_var, source in _ENV_RANKS:
        rank, size = os.environ.get(rank_var), os.environ.get(size_var)
        if rank is not None and size is not None and rank.isdigit() and size.isdigit():
            return int(rank), int(size), source
    return 0, 1, "default (no process group, no launcher environment)"


def record() -> dict[str, Any]:
    """This process's telemetry record: what ``write`` puts in its file."""
    import dtdispatch

    rank, world_size, source = _rank_and_world()
    native, why = dtdispatch.native_status()
    stats = dtdispatch.stats()
    return {
        "format": FORMAT,
        "rank": rank,
        "world_size": world_size,
        "rank_source": source,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "torch_version": torch.__version__,
        "implementation": stats["implementation"],
        "native_status": [native, why],
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "stats": stats,
    }


def write(directory: str | os.PathLike[str]) -> Path:
    """Write this process's record into ``directory`` (created if needed); return the file."""
    data = record()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dtdispatch-rank{data['rank']}-of-{data['world_size']}-pid{data['pid']}.json"
    tmp = path.with_name(path.name + ".tmp")
    # default=str: a stats() section with a value JSON cannot hold is still written, as text.
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def _write_at_exit() -> None:
    if not _target:
        return
    try:
        write(_target[0])
    except Exception as exc:  # NOTE: at exit, a traceback would hide the program's own output
        print(f"dtdispatch telemetry: could not write to {_target[0]}: {exc}", file=sys.stderr)


def install_from_env() -> None:
    """Arm the exit-time writer when ``DTDISPATCH_TELEMETRY`` is set (called at import)."""
    directory = os.environ.get(ENV)
    if directory:
        _target[:] = [Path(directory)]
        atexit.register(_write_at_exit)


def disarm() -> None:
    """Write nothing at exit (the merge CLI: it reads the directory, it is not part of the run)."""
    _target.clear()


