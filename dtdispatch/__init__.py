"""dtdispatch: fast dispatch for PyTorch DTensor.

``accelerate(x)`` opts a DTensor (or every DTensor parameter and buffer of an ``nn.Module``) into
dtdispatch; ``to_torch(x)`` takes it back. ``stats()`` says where dispatch time goes;
``DTDISPATCH_TELEMETRY=DIR`` writes it per process at exit (``python -m dtdispatch.telemetry``).
"""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dtdispatch import _compat, _telemetry, _tensor
from dtdispatch import above as _above
from dtdispatch import cache as _cache
from dtdispatch import dispatcher as _dispatcher
from dtdispatch import native as _native
from dtdispatch._tensor import FastDTensor, as_fast, as_stock
from dtdispatch._training import coverage, unwrap_hooks, wrap_hooks

__all__ = [
    "FastDTensor",
    "accelerate",
    "clear_cache",
    "coverage",
    "native_status",
    "reset_stats",
    "set_cache_capacity",
    "stats",
    "to_torch",
]

T = TypeVar("T")


_RETYPABLE = (DTensor, FastDTensor)
"""Exact types that ``accelerate`` / ``to_torch`` retype in place: FastDTensor adds no instance
layout to DTensor (``__slots__ = ()``), so the same object can change between them."""


def _convert_tensor(t: DTensor, convert: Any, target: type, done: dict[int, Any]) -> Any:
    """``t`` as a ``target`` tensor: the same object retyped in place when its type is exactly
    DTensor or FastDTensor, else (a user's DTensor subclass) a converted object, one per source
    object (``done``), so that a tensor shared by several modules stays shared."""
    if type(t) in _RETYPABLE:
        # NOTE: in place, not a new Parameter: optimizers, tied modules, hooks, the autograd
        # leaf (AccumulateGrad holds this tensor), ``_is_param`` and any state keyed by the object
        # all keep seeing the same tensor (it is what above._retype does for outputs).
        t.__class__ = target
        grad = t.grad
        if isinstance(grad, DTensor) and type(grad) is not target:
            if type(grad) in _RETYPABLE:
                grad.__class__ = target
            else:
                t.grad = convert(grad)
        return t
    new = done.get(id(t))
    if new is None:
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(convert(t.detach()), requires_grad=t.requires_grad)
            if t.grad is not None:
                new.grad = convert(t.grad)
        else:
            new = convert(t)
        done[id(t)] = new
    return new


def _convert_module(module: nn.Module, convert: Any, target: type) -> None:
    """Make every DTensor parameter and buffer of ``module`` and its submodules a ``target``
    (``_convert_tensor``), in the same dict entries."""
    done: dict[int, Any] = {}
    for sub in module.modules():
        for entries in (sub._parameters, sub._buffers):
            for name, value in list(entries.items()):
                # NOTE: a tensor already of the target type is kept (same object).
                if isinstance(value, DTensor) and type(value) is not target:
                    entries[name] = _convert_tensor(value, convert, target, done)


_warned_unsupported = False


def accelerate(x: T) -> T:
    """Opt ``x`` into dtdispatch.

    A ``DTensor`` gives a ``FastDTensor`` sharing its local shard and spec (zero-copy;
    differentiable). An ``nn.Module`` has its DTensor parameters and buffers retyped in place and
    is returned: each stays the same object (still an ``nn.Parameter``, same ``requires_grad``,
    gradient, hooks), so an optimizer made before this call keeps training them and a parameter
    shared by several modules (tied weights) stays one parameter. A parameter on the meta device
    stays a FastDTensor through ``to_empty``.

    For a module, the whole training step then runs on dtdispatch: the forward (pre-)hooks of
    torch's parallel styles (``parallelize_module``, ``distribute_module``) hand out FastDTensor
    activations instead of plain DTensors (``dtdispatch._training``) and gradients come out as
    FastDTensors. Results are unchanged; ``coverage(step)`` says how much of a step was on it.
    ``torch.compile`` works on the result (README, "torch.compile"); this call registers what Dynamo
    needs for it. On torch < 2.13, which never calls a DTensor subclass's ``__torch_dispatch__``,
    only the path above dispatch runs (calls that need no autograd); with that path off
    (``DTDISPATCH_ABOVE=0``) ``accelerate`` warns once and returns ``x`` unchanged
    (``native_status()`` says why).
    """
    unsupported = _compat.unsupported_reason(_dispatcher.active_function() != "off")
    if unsupported is not None:
        global _warned_unsupported
        if not _warned_unsupported:
            _warned_unsupported = True
            warnings.warn(f"dtdispatch.accelerate does nothing: {unsupported}", stacklevel=2)
        return x
    _telemetry.note_process_group()
    _tensor.prepare_compile()
    if isinstance(x, nn.Module):
        _convert_module(x, as_fast, FastDTensor)
        wrap_hooks(x)
        return x
    if isinstance(x, DTensor):
        return as_fast(x)  # type: ignore[return-value]
    raise TypeError(
        f"dtdispatch.accelerate expects a DTensor or an nn.Module, got {type(x).__name__}"
    )


def to_torch(x: T) -> T:
    """The inverse of ``accelerate``: plain DTensors (zero-copy), torch's own hooks on modules.
    A module's parameters and buffers are retyped in place, as ``accelerate`` does."""
    if isinstance(x, nn.Module):
        unwrap_hooks(x)
        _convert_module(x, as_stock, DTensor)
        return x
    if isinstance(x, DTensor):
        return as_stock(x)  # type: ignore[return-value]
    raise TypeError(
        f"dtdispatch.to_torch expects a DTensor or an nn.Module, got {type(x).__name__}"
    )


def _merge(total: dict[str, Any], part: dict[str, Any]) -> None:
    for field in ("hits", "misses", "evictions"):
        total[field] += part.get(field, 0)
    total["entries"] += part.get("entries", 0)
    for reason, n in part["bailouts"].items():
        total["bailouts"][reason] = total["bailouts"].get(reason, 0) + n
    for op, c in part["per_op"].items():
        mine = total["per_op"].setdefault(op, {"hits": 0, "misses": 0, "bailouts": 0})
        for field in ("hits", "misses", "bailouts"):
            mine[field] += c[field]
    for op, reasons in part["bailouts_per_op"].items():
        by_reason = total["bailouts_per_op"].setdefault(op, {})
        for reason, n in reasons.items():
            by_reason[reason] = by_reason.get(reason, 0) + n


def stats() -> dict[str, Any]:
    """Plan-cache telemetry of this process, aggregated over all threads (finished ones included).

    Keys: ``hits``, ``misses``, ``entries`` (live plans), ``evictions``, ``bailouts`` {reason:
    count} (calls the native path handed to Python, by reason), ``per_op`` {op: {hits, misses,
    bailouts}}, ``bailouts_per_op`` {op: {reason: count}}, ``threads`` (the same per live thread,
    by thread name), ``implementation`` ("native" or "python").
    """
    total: dict[str, Any] = {
        "hits": 0,
        "misses": 0,
        "entries": 0,
        "evictions": 0,
        "bailouts": {},
        "per_op": {},
        "bailouts_per_op": {},
    }
    retired = _cache.retired_totals()
    retired["entries"] = 0
    _merge(total, retired)
    threads = {}
    for thread_cache in _cache.all_caches():
        snap = thread_cache.snapshot()
        threads[thread_cache.thread_name] = snap
        _merge(total, snap)
    total["threads"] = threads
    total["implementation"] = _dispatcher.active()
    total["above"] = _above_stats()
    return total


def _above_stats() -> dict[str, Any]:
    """The path above dispatch (``__torch_function__``, DESIGN §12), aggregated over threads."""
    total: dict[str, Any] = {
        "hits": 0,
        "misses": 0,
        "entries": 0,
        "evictions": 0,
        "negative": {},
        "stepped_aside": {},
        "per_func": {},
    }
    parts = [_above.retired_totals()] + [c.snapshot() for c in _above.all_caches()]
    for part in parts:
        total["entries"] += part.get("entries", 0)
        total["evictions"] += part["evictions"]
        for field in ("negative", "stepped_aside"):
            for reason, n in part[field].items():
                total[field][reason] = total[field].get(reason, 0) + n
        for func, c in part["per_func"].items():
            mine = total["per_func"].setdefault(func, {"hits": 0, "misses": 0, "negative": 0})
            for field in ("hits", "misses", "negative"):
                mine[field] += c[field]
    total["hits"] = sum(c["hits"] for c in total["per_func"].values())
    total["misses"] = sum(c["misses"] for c in total["per_func"].values())
    total["passthrough_funcs"] = len(_above.passthrough)
    total["implementation"] = _dispatcher.active_function()
    return total


def reset_stats() -> None:
    """Zero every counter (plans stay cached)."""
    _cache.reset_retired()
    for thread_cache in _cache.all_caches():
        thread_cache.reset_stats()
    _above.reset_retired()
    for above_cache in _above.all_caches():
        above_cache.reset_stats()


def clear_cache() -> None:
    """Drop every cached plan in every thread (counters stay)."""
    for thread_cache in _cache.all_caches():
        thread_cache.entries.clear()
    for above_cache in _above.all_caches():
        above_cache.clear()


def set_cache_capacity(capacity: int) -> None:
    """Bound each thread's plan cache, and its cache above dispatch, to ``capacity`` entries (LRU;
    evictions are counted)."""
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"cache capacity must be a positive int, got {capacity!r}")
    _cache.set_default_capacity(capacity)
    for above_cache in _above.all_caches():
        above_cache.evict_to(capacity)


def native_status() -> tuple[bool, str]:
    """(whether the C extension is the active implementation, why; the why also names the
    implementation of the path above dispatch)."""
    active = _dispatcher.active() == "native"
    reason = (
        _native.REASON
        if active or _dispatcher.active() == _native.DEFAULT
        else "Python twin selected"
    )
    function = _dispatcher.active_function()
    if function == "off":
        above = "off"
    elif function == "native":
        above = _native.FUNCTION_REASON
    else:
        above = "Python twin" if _dispatcher.active() == "python" else _native.FUNCTION_REASON
    status = f"{reason}; above dispatch: {above}"
    unsupported = _compat.unsupported_reason(function != "off")
    if unsupported is not None:
        status += f"; accelerate does nothing: {unsupported}"
    elif not _compat.SUBCLASS_DISPATCH:
        status += (
            f"; torch {torch.__version__} never calls __torch_dispatch__ on a DTensor subclass: "
            "only calls that need no autograd run on dtdispatch (above dispatch), the rest take "
            "torch's path"
        )
    return active, status


# DTDISPATCH_TELEMETRY=DIR: write stats() into DIR at exit (python -m dtdispatch.telemetry DIR
# merges them).
_telemetry.install_from_env()
