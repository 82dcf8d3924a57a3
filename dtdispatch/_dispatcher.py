"""The slow path: ask torch's sharding propagator, write the plan, run it (ARCHITECTURE "Layers").

The native entry (``_native._dispatch.dispatch`` or its twin) is FastDTensor's
``__torch_dispatch__``; it calls ``slow_path`` for everything it does not replay itself.
"""

from __future__ import annotations

import inspect
import os
import sys
from types import FrameType, ModuleType
from typing import Any

import torch
from torch._ops import OpOverload
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor._op_schema import OutputSharding
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.placement_types import _MaskPartial
from torch.utils import _python_dispatch
from torch.utils import _pytree as pytree

from dtdispatch import _above, _compat
from dtdispatch import _native as _native_pkg
from dtdispatch import cache as _cache
from dtdispatch._bitwise import comparable
from dtdispatch._tensor import FAST_TYPES, AutogradFastDTensor, FastDTensor, _FastDTensorBase
from dtdispatch.local_results import execute, make_plan

__all__ = ["install", "slow_path"]

_op_dispatcher = DTensor._op_dispatcher


def _to_fast(result: object) -> object:
    def convert(t: object) -> object:
        if isinstance(t, DTensor) and type(t) not in FAST_TYPES:
            return torch.Tensor._dtensor__new__(
                FastDTensor, t._local_tensor, t._spec, requires_grad=t.requires_grad
            )
        return t

    return pytree.tree_map(convert, result)


def _keys_every_rewritten_value(
    op: OpOverload, args: tuple[Any, ...], sharding: OutputSharding
) -> bool:
    """False when the plan would replay a rewritten value that the key does not pin.

    A sharded view's plan stores the local shape computed from the call's shape argument; that is
    only safe to replay when the argument is part of the key (index >= static_argnum, keyed by
    value).
    """
    if not sharding.use_val_from_redistribute_schema:
        return True
    if op in _cache._VALUE_FREE_OPS:
        return False
    static_argnum = _cache.schema_info(op).static_argnum
    return all(
        index >= static_argnum or arg is None or isinstance(arg, torch.Tensor)
        for index, arg in enumerate(args)
    )


def _holds_mask(key: tuple[object, ...]) -> bool:
    """True when the key holds a spec with a ``_MaskPartial`` placement: an unreduced embedding
    (or gather) output. Its mask buffer is per-call state and enters the spec's equality by
    identity, so no later call can hit such a key; caching it would only keep the mask alive."""
    for entry in key:
        if type(entry) is tuple and len(entry) == 2:
            entry = entry[1]  # a kwarg's (name, entry)
        if isinstance(entry, DTensorSpec) and any(
            isinstance(p, _MaskPartial) for p in entry.placements
        ):
            return True
    return False


def _raise_if_mixed(op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """torch's C++ error for a plain multi-element tensor beside DTensors (same type, same
    message)."""
    if _op_dispatcher._allow_implicit_replication:
        return
    leaves = pytree.tree_leaves((args, kwargs))
    if any(isinstance(t, DTensor) for t in leaves) and any(
        isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.numel() != 1
        for t in leaves
    ):
        raise RuntimeError(
            f"{op} got mixed torch.Tensor and DTensor, need to convert all torch.Tensor to DTensor "
            "before calling distributed operators!"
        )


def _readable_locals(op_info: Any) -> bool:
    """Whether every local tensor of the call has values a plan-time check can compare.

    NOTE: a plan verified without values (a meta local: ``_bitwise.comparable``) lacks its
    verified shortcuts; the key does not tell a meta local from the materialized one it becomes, so
    such a plan is used once and not cached, and the first call after materialization plans anew.
    """
    leaves = pytree.tree_leaves((op_info.local_args, op_info.local_kwargs))
    return all(comparable(t) for t in leaves if isinstance(t, torch.Tensor))


# NOTE: unwrapped: torch decorates the handler (torch._disable_dynamo).
_COMM_MODE_DISPATCH_CODE = inspect.unwrap(CommDebugMode.__torch_dispatch__).__code__
_COMM_MODE_FRAMES = 8
"""How far up from ``slow_path`` a CommDebugMode handler may sit: its ``func(*args, **kwargs)``,
``OpOverload.__call__``, the twin's ``dispatch`` (the C one has no frame), with room to spare."""


def _stashed_comm_mode() -> CommDebugMode | None:
    """The CommDebugMode whose ``__torch_dispatch__`` is running this call, else None.

    torch's CommDebugMode hands a call on to DTensor (returns NotImplemented, so DTensor dispatches
    with the mode active and the mode counts its collectives) only when ``type is DTensor`` for one
    of the call's types; for a FastDTensor it runs ``func(*args, **kwargs)`` itself, with itself
    taken off the mode stack while it does, so the collectives of an implicit redistribution on
    the dispatch path would not reach it. NOTE: found from the frames, because that is the only
    place the taken-off mode is visible; the module flag keeps the common case (no mode entered
    anywhere) at one attribute read.
    """
    if not _python_dispatch._is_in_torch_dispatch_mode:
        return None
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_COMM_MODE_FRAMES):
        if frame is None:
            return None
        if frame.f_code is _COMM_MODE_DISPATCH_CODE:
            mode = frame.f_locals.get("self")
            return mode if isinstance(mode, CommDebugMode) else None
        frame = frame.f_back
    return None


def slow_path(
    op: OpOverload,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    reason: str,
    key: tuple[object, ...] | None,
    plan: Any,
) -> object:
    """Handle one call the native path handed over. ``plan`` is set on a hit whose plan is not
    ``fast``.

    Under ``CommDebugMode`` (torch's, counting collectives), the mode is put back on the stack
    while the call runs, as stock DTensor's dispatch runs with it active: the collectives of the
    call's redistributions (and of custom handlers) are counted as on stock. Plans the native
    path replays itself never communicate."""
    mode = _stashed_comm_mode()
    if mode is None:
        return _slow_path(op, args, kwargs, reason, key, plan)
    _python_dispatch._push_mode(mode)
    try:
        return _slow_path(op, args, kwargs, reason, key, plan)
    finally:
        _python_dispatch._pop_mode()


def _slow_path(
    op: OpOverload,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    reason: str,
    key: tuple[object, ...] | None,
    plan: Any,
) -> object:
    cache = _cache.thread_cache()
    cache.count_bailout(op, reason)
    if plan is not None:
        # The decision is cached; only its execution needs Python (no new sharding propagation).
        return execute(plan, op, args, kwargs)
    if reason == "custom handler":
        # NOTE: the live table (ARCHITECTURE 'The paths a call can take'): loss_parallel() and
        # context parallel change it at run time.
        return _to_fast(_op_dispatcher._custom_op_handlers[op](op, args, kwargs))
    if reason == "no key":
        _raise_if_mixed(op, args, kwargs)
    op_info = _op_dispatcher.unwrap_to_op_info(op, args, kwargs)
    # torch's own slow path: non-cached propagation, torch's exception types and messages, and the
    # CompositeImplicitAutograd decomposition when no strategy exists.
    sharding = _op_dispatcher._propagate_op_sharding_dispatch_slow_path(
        op, args, kwargs, op_info, try_cache=False
    )
    if not isinstance(sharding, OutputSharding):
        cache.count_bailout(op, "decomposition")
        return sharding
    cacheable = key is not None and _keys_every_rewritten_value(op, args, sharding)
    new_plan = make_plan(op, op_info, sharding, cacheable=cacheable)
    if key is not None and cacheable and not _holds_mask(key) and _readable_locals(op_info):
        cache.insert(key, new_plan)
    return execute(new_plan, op, args, kwargs)


_active = ""


ABOVE_DEFAULT = os.environ.get("DTDISPATCH_ABOVE", "1") != "0"
"""Whether ``install`` enables the path above dispatch by default (``DTDISPATCH_ABOVE=0``: off)."""


def install(name: str, *, above: bool | None = None) -> None:
    """Make implementation ``name`` ("native" or "python") FastDTensor's ``__torch_dispatch__``
    and, unless ``above`` is False (default: ``ABOVE_DEFAULT``), its ``__torch_function__`` (the
    path above dispatch, ARCHITECTURE "The path above dispatch"; off, FastDTensor keeps stock
    DTensor's disabled one)."""
    global _active, _active_function
    impls: dict[str, ModuleType] = _native_pkg.implementations()
    if name not in impls:
        raise ValueError(
            f"dtdispatch implementation {name!r} is not available (have {sorted(impls)}): "
            f"{_native_pkg.REASON}"
        )
    module = impls[name]
    module.configure(
        {
            "slow_path": slow_path,
            "op_dispatcher": _op_dispatcher,
            "dtensor_type": DTensor,
            "tensor_type": torch.Tensor,
            "fast_type": FastDTensor,
            "autograd_type": AutogradFastDTensor,
            "grad_enabled": torch.is_grad_enabled,
            "graph_task_id": torch._C._current_graph_task_id,
            "new": torch.Tensor._dtensor__new__,
            "thread_cache": _cache.thread_cache,
            "unsafe_set": torch._functionalize_unsafe_set,
            "explicit_local": _compat.explicit_redistribution_local,
            "torch_function_mode_enabled": torch._C._is_torch_function_mode_enabled,
        }
    )
    # On the roles' common base: both roles' aten ops go through dtdispatch.
    _FastDTensorBase.__torch_dispatch__ = classmethod(module.dispatch)  # type: ignore[assignment]
    # The path above dispatch (ARCHITECTURE "The path above dispatch"): the same implementation
    # when it is built, else its twin.
    if not (ABOVE_DEFAULT if above is None else above):
        FastDTensor.__torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]
        _active_function = "off"
        _active = name
        return
    function_impls = _native_pkg.function_implementations()
    function_module = function_impls.get(name, function_impls["python"])
    function_module.configure(_above.config())
    FastDTensor.__torch_function__ = classmethod(function_module.torch_function)  # type: ignore[assignment]
    _active_function = "native" if function_module is function_impls.get("native") else "python"
    _active = name


def active() -> str:
    return _active


_active_function = ""


def active_function() -> str:
    """The implementation of the path above dispatch now installed ("native", "python" or
    "off")."""
    return _active_function


# The Python entry points that torch (FastDTensor's handlers) or the C hot paths call: Dynamo must
# never compile them, nor what they call (see _compat.skip_dynamo_frames).
_compat.skip_dynamo_frames(
    slow_path,
    _above.miss,
    _above.stock_call,
    _above.thread_cache,
    _cache.thread_cache,
    _native_pkg.implementations()["python"].dispatch,
    _native_pkg.function_implementations()["python"].torch_function,
)

install(_native_pkg.DEFAULT)
