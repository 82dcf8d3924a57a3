"""dtdispatch: fast dispatch for PyTorch DTensor.

``accelerate(x)`` opts a DTensor (or every DTensor parameter and buffer of an ``nn.Module``) into
dtdispatch; ``to_torch(x)`` takes it back. ``stats()`` says where dispatch time goes;
``DTDISPATCH_TELEMETRY=DIR`` writes it per process at exit (``python -m dtdispatch.telemetry``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dtdispatch import (
    _above,
    _compat,
    _dispatcher,
    _hash_seed,
    _native,
    _telemetry,
    _tensor,
    _training,
)
from dtdispatch import cache as _cache
from dtdispatch._grads import reduce_partial_grads
from dtdispatch._tensor import AutogradFastDTensor, FastDTensor, as_fast, as_stock, role
from dtdispatch._training import unwrap_hooks, wrap_hooks

__all__ = [
    "FastDTensor",
    "NativeStatus",
    "accelerate",
    "clear_cache",
    "coverage",
    "native_status",
    "reduce_partial_grads",
    "reset_stats",
    "set_cache_capacity",
    "stats",
    "to_torch",
]

T = TypeVar("T")

# NOTE: at import, before any sharding strategy is chosen: torch's caches keep the first choice,
# for stock DTensors and FastDTensors alike.
_hash_seed.install()


_RETYPABLE = (DTensor, FastDTensor, AutogradFastDTensor)
"""Exact types that ``accelerate`` / ``to_torch`` retype in place: FastDTensor (either role) adds
no instance layout to DTensor (``__slots__ = ()``), so the same object can change between them."""


def _target_type(target: type, t: torch.Tensor, *, gradient: bool = False) -> type:
    """``target``, or for FastDTensor the role ``t`` takes (ARCHITECTURE "Two roles: replay and
    autograd"): a gradient's is the autograd role, as the backward pass gives it."""
    if target is not FastDTensor:
        return target
    return role(gradient or t.requires_grad)


def _convert_tensor(t: DTensor, convert: Any, target: type, done: dict[int, Any]) -> Any:
    """``t`` as a ``target`` tensor: the same object retyped in place when its type is exactly
    DTensor or FastDTensor, else (a user's DTensor subclass) a converted object, one per source
    object (``done``), so that a tensor shared by several modules stays shared."""
    if type(t) in _RETYPABLE:
        # NOTE: in place, not a new Parameter: optimizers, tied modules, hooks, the autograd
        # leaf (AccumulateGrad holds this tensor), ``_is_param`` and any state keyed by the object
        # all keep seeing the same tensor (it is what _above._retype does for outputs).
        t.__class__ = _target_type(target, t)
        grad = t.grad
        if isinstance(grad, DTensor) and type(grad) is not (
            grad_type := _target_type(target, grad, gradient=True)
        ):
            if type(grad) in _RETYPABLE:
                grad.__class__ = grad_type
            else:
                t.grad = convert(grad)
        return t
    new = done.get(id(t))
    if new is None:
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(convert(t.detach()), requires_grad=t.requires_grad)
            if isinstance(new, FastDTensor):
                # NOTE: nn.Parameter keeps the data's type, made before it required grad.
                new.__class__ = role(new.requires_grad)  # type: ignore[assignment]
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
    needs for it. On a torch that never calls a DTensor subclass's ``__torch_dispatch__`` (2.11),
    only the path above dispatch runs (calls that need no autograd); with that path off
    (``DTDISPATCH_ABOVE=0``) ``accelerate`` warns once and returns ``x`` unchanged
    (``native_status()`` says why).

    Args:
        x: a ``DTensor`` or an ``nn.Module``.

    Returns:
        For a DTensor, a new ``FastDTensor`` on the same local tensor and spec (``x`` itself if it
        already is one); for a module, ``x`` itself, converted in place. ``x`` unchanged where
        dtdispatch cannot run (see above).

    Raises:
        TypeError: ``x`` is neither a DTensor nor an ``nn.Module``.
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

    Args:
        x: a ``DTensor`` (a ``FastDTensor`` or a plain one) or an ``nn.Module``.

    Returns:
        For a DTensor, a plain ``DTensor`` on the same local tensor and spec (``x`` itself if it
        already is one); for a module, ``x`` itself with its DTensor parameters and buffers retyped
        back in place, as ``accelerate`` does (the same objects: identity, ``nn.Parameter``,
        gradients, hooks, optimizer state and tied weights are kept), and torch's own
        parallel-style hooks restored.

    Raises:
        TypeError: ``x`` is neither a DTensor nor an ``nn.Module``.
    """
    if isinstance(x, nn.Module):
        unwrap_hooks(x)
        _convert_module(x, as_stock, DTensor)
        return x
    if isinstance(x, DTensor):
        return as_stock(x)  # type: ignore[return-value]
    raise TypeError(
        f"dtdispatch.to_torch expects a DTensor or an nn.Module, got {type(x).__name__}"
    )


def stats() -> dict[str, Any]:
    """Plan-cache telemetry of this process, aggregated over all threads (finished ones included).

    Counters run from import or the last ``reset_stats()``; ``DTDISPATCH_TELEMETRY=DIR`` writes
    this dict per process at exit.

    Returns:
        A dict with these keys; the first seven are the dispatch path (``__torch_dispatch__``):

        - ``hits``, ``misses``: aten calls that replayed a cached plan / planned one.
        - ``entries``: live plans in the threads' caches; ``evictions``: plans dropped by the LRU.
        - ``bailouts``: ``{reason: count}``, calls the native path handed to Python (a miss counts
          as reason ``"miss"``; other reasons are plans only Python runs).
        - ``per_op``: ``{op: {"hits", "misses", "bailouts"}}``.
        - ``bailouts_per_op``: ``{op: {reason: count}}``.
        - ``threads``: ``{thread name: {...}}``, the keys above for each live thread.
        - ``implementation``: ``"native"`` (the C extension) or ``"python"`` (its twin).
        - ``above``: the path above dispatch (``__torch_function__``): ``hits`` (calls replayed
          on the local tensors), ``misses`` (calls observed to write a plan), ``entries``,
          ``evictions``, ``negative`` ``{reason: count}`` (calls whose key holds a refusal and so
          took the stock path), ``stepped_aside`` ``{reason: count}`` (calls that never looked
          up a key: autograd needed, a mode active, compiling, a view function such as
          ``x.t()``, no key), ``per_func`` ``{function
          name: {"hits", "misses", "negative"}}``, ``passthrough_funcs`` (how many functions are
          known to dispatch nothing and go straight to torch) and ``implementation``
          (``"native"``, ``"python"`` or ``"off"``).
    """
    total = _cache.registry.totals()
    total["threads"] = {c.thread_name: c.snapshot() for c in _cache.registry.caches()}
    total["implementation"] = _dispatcher.active()
    total["above"] = _above_stats()
    return total


def _above_stats() -> dict[str, Any]:
    """The path above dispatch (``__torch_function__``; ARCHITECTURE "The path above dispatch"),
    aggregated over threads."""
    total = _above.registry.totals()
    total["passthrough_funcs"] = len(_above.passthrough)
    total["implementation"] = _dispatcher.active_function()
    return total


def reset_stats() -> None:
    """Zero every counter of ``stats()`` in every thread, finished ones included; plans stay
    cached."""
    for registry in (_cache.registry, _above.registry):
        registry.reset_retired()
        for cache in registry.caches():
            cache.reset_stats()


def clear_cache() -> None:
    """Drop every cached plan, below and above dispatch, in every thread; counters stay."""
    for thread_cache in _cache.registry.caches():
        thread_cache.entries.clear()
    for above_cache in _above.registry.caches():
        above_cache.clear()


def set_cache_capacity(capacity: int) -> None:
    """Bound each thread's plan cache, and its cache above dispatch, to ``capacity`` entries.

    Both are LRU (4096 entries by default); caches over the new bound evict their oldest entries,
    and every eviction is counted in ``stats()``.

    Args:
        capacity: the new bound, a positive ``int``.

    Raises:
        ValueError: ``capacity`` is not a positive ``int`` (``bool`` included).
    """
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"cache capacity must be a positive int, got {capacity!r}")
    _cache.set_default_capacity(capacity)
    for above_cache in _above.registry.caches():
        above_cache.evict_to(capacity)


def coverage(step: Callable[[], Any], *, by_op: bool = False) -> dict[str, Any]:
    """Run ``step()`` once and count how many of its DTensor op dispatches went through dtdispatch.

    ``n`` counts every aten call that entered dtdispatch (hits, misses, and calls handed to Python
    before any cache lookup); ``m`` counts every aten call on plain DTensors that reached torch's
    own sharding cache (torch's per-thread counters). Torch does not count its custom-handler ops
    nor calls it cannot key (symbolic shapes), so ``m`` can be slightly low; backward run on other
    threads (autograd's CUDA device threads) is missed on stock's side, so measure on CPU.
    Redistributions and ``from_local``/``to_local`` count on neither side. On a torch without
    those counters, ``m`` is counted as with ``by_op=True``.

    Args:
        step: a callable taking no arguments, e.g. one training step.
        by_op: also list the ops that took torch's path; this runs ``step`` under a
            ``TorchDispatchMode``, which slows it down (leave it off for timing).

    Returns:
        ``{"dtdispatch": n, "stock": m, "fraction": n / (n + m), "result": step's return value}``
        (``fraction`` is NaN when the step dispatched no DTensor op), plus ``"stock_ops"``, a
        ``Counter`` of the ops that took torch's path, with ``by_op=True``.
    """
    return _training.coverage(step, by_op=by_op)


class NativeStatus(NamedTuple):
    """What ``native_status()`` returns; unpacks as ``active, reason = native_status()``."""

    active: bool
    """Whether the C extension is the active implementation of the dispatch path."""
    reason: str
    """Why, which implementation runs the path above dispatch, and what dtdispatch cannot do on
    this torch, if anything."""


def native_status() -> NativeStatus:
    """Say which implementation runs and why.

    Returns:
        ``NativeStatus(active, reason)``: ``active`` is whether the C extension is the active
        implementation of the dispatch path (``DTDISPATCH_NATIVE=0`` or a failed build select the
        Python twin); ``reason`` says why, names the implementation of the path above dispatch
        (or "off") and, on a torch where dtdispatch runs above dispatch only or not at all, says
        so.
    """
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
    return NativeStatus(active, status)


# DTDISPATCH_TELEMETRY=DIR: write stats() into DIR at exit (python -m dtdispatch.telemetry DIR
# merges them).
_telemetry.install_from_env()
