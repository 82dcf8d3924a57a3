"""The collectives of a redistribution on a 1-D CPU mesh, called on the process group itself
(ARCHITECTURE "The DTensor API calls").

Torch's ``redistribute_local_tensor`` reaches the same process-group calls through its functional
collectives (``torch.ops._c10d_functional``): a custom op with a Python autograd wrapper, a work
registry, an ``AsyncCollectiveTensor`` and a ``wait_tensor`` per collective. Each function below
makes the one call that op makes (the same ``ProcessGroup`` method on the same buffers, so the
same reduction order and bits), with torch's layout steps around it. Synchronously it waits on
the work; with ``async_op`` it returns what torch returns there: an ``AsyncCollectiveTensor`` on
the buffer, its work registered with torch's work registry, so the first use waits (torch's
``wait_tensor``), or a plain tensor where torch waits early itself.

NOTE: only outside tracing and outside every torch function and dispatch mode (``usable``): a mode
observes the functional collectives' ops (``CommDebugMode``, ``DebugMode``) and a traced graph
needs them; there the caller takes torch's path.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.distributed import ReduceOp
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.distributed_c10d import AllreduceOptions, ReduceScatterOptions

from dtdispatch import _compat

__all__ = ["ENABLED", "all_gather", "all_reduce_sum", "reduce_scatter_sum", "unobserved", "usable"]

_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_tf_mode = torch._C._is_torch_function_mode_enabled
_grad_enabled = torch.is_grad_enabled
_below_autograd = torch._C._AutoDispatchBelowADInplaceOrView


# NOTE: the dtypes checked bitwise against torch's path. torch's functional collectives adapt
# others before the process group sees them (gloo refuses a complex buffer as it stands).
_DTYPES = frozenset({torch.float32, torch.float64})
_SUM = ReduceOp(ReduceOp.SUM)


ENABLED = os.environ.get("DTDISPATCH_DIRECT_COLLECTIVES", "1") != "0"
"""Whether direct collectives are used at all (``DTDISPATCH_DIRECT_COLLECTIVES=0``: torch's path
everywhere; the benchmarks flip it to time both in one process)."""


def unobserved() -> bool:
    """No torch function or dispatch mode is active and nothing is traced: nothing sees how a
    redistribution is done."""
    return _dispatch_stack_len() == 0 and not _tf_mode() and not _compat.is_compiling()


def usable(local: torch.Tensor) -> bool:
    """Whether ``local`` may take a direct collective: enabled, a plain float32/float64 CPU tensor
    that no autograd graph records here, no mode active."""
    return (
        ENABLED
        and type(local) is torch.Tensor
        and local.dtype in _DTYPES
        and local.device.type == "cpu"
        # NOTE: the wrappers' Functions run this with grad mode off; a local that would record a
        # graph here is left to torch's functional collectives, which carry an autograd formula.
        and not (local.requires_grad and _grad_enabled())
        and unobserved()
    )


def all_gather(
    local: torch.Tensor, group: Any, size: int, dim: int, async_op: bool
) -> torch.Tensor | None:
    """``Shard(dim)._to_replicate_tensor`` for an even split: ``funcol.all_gather_single``'s
    ``allgather_into_tensor_coalesced`` into a fresh buffer gathered on dim 0, then its move to
    ``dim`` (``_maybe_view_chunk_cat``). None (take torch's path) for a non-contiguous local, a
    torch without that layout step, or an asynchronous gather that torch returns as a view."""
    if not local.is_contiguous() or (dim != 0 and not _compat.ALL_GATHER_VIEW_LAYOUT):
        return None
    shape = list(local.shape)
    shape[0] *= size
    view = dim != 0 and shape[0] == size and math.prod(shape[1:dim]) == 1
    if async_op and (view or _compat.register_work is None):
        return None
    out = local.new_empty(shape)
    work = group.allgather_into_tensor_coalesced([out], [local])
    if dim == 0:
        return _finish(out, work, async_op)
    # NOTE: torch waits here even asynchronously when it must move data to ``dim``.
    work.wait()
    if view:
        # NOTE: torch reshapes the gathered buffer without moving data here, and it does so on
        # its AsyncCollectiveTensor, below autograd: the result aliases the buffer but is not an
        # autograd view (``_is_view()`` False), so neither is this one.
        with _below_autograd():
            return out.view([1, *shape[1:dim], size * shape[dim], *shape[dim + 1 :]])
    return torch.cat(torch.chunk(out, size, dim=0), dim=dim)


def reduce_scatter_sum(
    local: torch.Tensor, group: Any, size: int, dim: int, async_op: bool
) -> torch.Tensor | None:
    """``Partial("sum")._reduce_shard_value`` for an even split: the local made contiguous, its
    chunks along ``dim`` concatenated on dim 0 (``funcol.reduce_scatter_single``), then the op's
    ``reduce_scatter_tensor_coalesced`` into a fresh buffer. None (torch's path) for an uneven
    split, which torch pads, or an asynchronous call on a torch without a work registry."""
    if local.size(dim) % size != 0 or (async_op and _compat.register_work is None):
        return None
    if not local.is_contiguous():
        local = local.contiguous()
    if dim != 0:
        local = torch.cat(torch.chunk(local, size, dim=dim), dim=0)
    shape = list(local.shape)
    shape[0] //= size
    out = local.new_empty(shape)
    options = ReduceScatterOptions()
    options.reduceOp = _SUM
    return _finish(out, group.reduce_scatter_tensor_coalesced([out], [local], options), async_op)


def all_reduce_sum(local: torch.Tensor, group: Any, async_op: bool) -> torch.Tensor | None:
    """``Partial("sum")._reduce_value``: ``funcol.all_reduce``'s contiguous clone, reduced in place
    with the op's ``allreduce``. None (torch's path) for an asynchronous call on a torch without a
    work registry."""
    if async_op and _compat.register_work is None:
        return None
    out = local.clone(memory_format=torch.contiguous_format)
    options = AllreduceOptions()
    options.reduceOp = _SUM
    return _finish(out, group.allreduce([out], options), async_op)


def _finish(out: torch.Tensor, work: Any, async_op: bool) -> torch.Tensor:
    if async_op:
        return _pending(out, work)
    work.wait()
    return out


def _pending(out: torch.Tensor, work: Any) -> torch.Tensor:
    """What torch's ``_maybe_wrap_tensor`` returns for a collective's output: the buffer in an
    ``AsyncCollectiveTensor``, its work registered so that torch's ``wait_tensor`` finds it."""
    assert _compat.register_work is not None  # checked by the callers
    _compat.register_work(out, work)
    return AsyncCollectiveTensor(out)
