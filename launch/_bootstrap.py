"""Process-group bootstrap shared by the launch scripts, under torchrun, mpiexec or plain python.

- torchrun: RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT come from the environment (``env://``).
- mpiexec (PMI_RANK, OMPI_COMM_WORLD_RANK or an MPI world larger than 1): mpi4py gives rank and
  size; rank 0 opens the rendezvous store on a free port and broadcasts the port (race-free: the
  store holds the port from the moment it is chosen); the usual env variables are set too.
- plain ``python launch/x.py``: a world of one.

Backend: nccl with one GPU per local rank when enough GPUs are visible, else gloo on CPU.
Every rank runs one intra-op thread.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class DistInfo:
    """What a launch script needs to know about its place in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    launcher: str  # "torchrun", "mpi" or "single"


def _under_mpi() -> bool:
    if any(v in os.environ for v in MPI_RANK_VARS):
        return True
    try:
        from mpi4py import MPI
    except ImportError:
        return False
    return bool(MPI.COMM_WORLD.Get_size() > 1)


def _abort_on_uncaught(comm: Any) -> None:
    """An uncaught exception on one MPI rank aborts the job; otherwise the other ranks may wait
    forever (MPICH's blocked ranks also spin at 100% CPU)."""
    previous = sys.excepthook

    def hook(*exc_info: Any) -> None:
        previous(*exc_info)
        sys.stderr.flush()
        comm.Abort(1)

    sys.excepthook = hook


def _mpi_store() -> tuple[dist.Store, int, int, int, int]:
    """(store, rank, world size, local rank, local world size) from MPI."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    _abort_on_uncaught(comm)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    hosts = comm.allgather(socket.gethostname())
    addr = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
    store = None
    port = 0
    if rank == 0:
        store = dist.TCPStore(addr, 0, size, is_master=True, timeout=TIMEOUT,
                              wait_for_workers=False)
        port = store.port
    port = comm.bcast(port, root=0)
    if store is None:
        store = dist.TCPStore(addr, port, size, is_master=False, timeout=TIMEOUT)
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_size))
    return store, rank, size, local_rank, local_size


def init_distributed() -> DistInfo:
    """Initialize the default process group for this launcher and return where this rank is."""
    torch.set_num_threads(1)
    store: dist.Store | None = None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launcher = "torchrun"
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    elif _under_mpi():
        launcher = "mpi"
        store, rank, size, local_rank, local_size = _mpi_store()
    else:
        launcher = "single"
        rank, size, local_rank, local_size = 0, 1, 0, 1
        store = dist.HashStore()
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= local_size
    if use_nccl:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_nccl else "gloo"
    if store is None:
        dist.init_process_group(backend, timeout=TIMEOUT)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=TIMEOUT)
    device = torch.device("cuda", local_rank) if use_nccl else torch.device("cpu")
    return DistInfo(rank, size, local_rank, backend, device, launcher)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once its output is flushed, skipping interpreter teardown.

    NOTE: call it after ``dist.destroy_process_group()``. On this torch, gloo's teardown at
    interpreter exit sometimes aborts a process whose work is done and whose groups are destroyed
    ("terminate called without an active exception", SIGABRT), more often under load: the launcher
    then reports a failure the script did not have. Nothing is left to finalize by then but MPI,
    which mpiexec expects (finalized here when mpi4py started it).
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

