"""The torch internals dtdispatch reads whose names or behaviour differ between the supported
releases (2.11-2.15).

NOTE: every lookup of a private torch name that is not in all supported releases goes through here,
so the version differences sit in one place and the rest of the code reads as if only torch 2.13
existed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.tensor._redistribute
import torch.distributed.tensor.debug
import torch.distributed.tensor.placement_types
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._ops._math_ops import _NormPartial

__all__ = [
    "ALL_GATHER_VIEW_LAYOUT",
    "NORM_REDUCE_BY_TRANSFORMS",
    "SUBCLASS_DISPATCH",
    "TO_LOCAL_KEEPS_PARAM",
    "ExplicitRedistributionContext",
    "clear_sharding_caches",
    "explicit_redistribution_local",
    "format_implicit_redistribution_msg",
    "is_compiling",
    "is_shard_like",
    "local_shard_size_and_offset",
    "nested_redistribute",
    "register_work",
    "run_dtensor_rng_op",
    "single_dim_schema_infos",
    "single_dim_strategy_funcs",
    "skip_dynamo_frames",
    "unsupported_reason",
]

_propagator = DTensor._op_dispatcher.sharding_propagator

# Ops registered through single-dim strategies keep their RuntimeSchemaInfo (and rule) in separate
# tables.
single_dim_schema_infos: dict[Any, Any] = getattr(
    _propagator, "op_to_schema_info_for_single_dim_strategy", {}
)
single_dim_strategy_funcs: dict[Any, Any] = getattr(_propagator, "op_single_dim_strategy_funcs", {})

try:
    from torch.distributed.tensor._utils import ExplicitRedistributionContext
    from torch.distributed.tensor._utils import (
        _format_implicit_redistribution_msg as format_implicit_redistribution_msg,
    )

    explicit_redistribution_local: Any = ExplicitRedistributionContext._local
except ImportError:  # no explicit-redistribution mode in this torch: nothing to observe
    ExplicitRedistributionContext = None  # type: ignore[assignment,misc]
    format_implicit_redistribution_msg = None  # type: ignore[assignment]
    explicit_redistribution_local = threading.local()

try:
    from torch._prims.rng_prims import run_dtensor_rng_op
except ImportError:  # older torch runs every random op under _distribute_region
    run_dtensor_rng_op = None

# torch < 2.13 has neither; _StridedShard is then the only other shard-like placement, and double
# backward through a redistribution goes through DTensor.redistribute.
is_shard_like: Callable[[Any], bool] = getattr(
    torch.distributed.tensor.placement_types,
    "_is_shard_like",
    lambda p: isinstance(p, (Shard, torch.distributed.tensor.placement_types._StridedShard)),
)
nested_redistribute: Any = getattr(
    torch.distributed.tensor._redistribute, "NestedRedistribute", None
)

# The fallback is the pre-2.13 staticmethod; torch 2.13's stubs describe it as an instance method.
local_shard_size_and_offset: Callable[..., Any] = (
    getattr(Shard, "local_shard_size_and_offset", None) or Shard._local_shard_size_and_offset
)

# Whether torch's all-gather on a dimension other than 0 ends with the layout step the direct
# all-gather (``_collectives``) mirrors (torch >= 2.13: ``_maybe_view_chunk_cat``); without it,
# those gathers are left to torch.
ALL_GATHER_VIEW_LAYOUT = hasattr(torch._utils, "_maybe_view_chunk_cat")

# Whether torch reduces a ``_NormPartial`` as its own transform, Partial's all-reduce, its own
# inverse transform (torch >= 2.13: ``_pre_reduce_transform`` / ``_post_reduce_transform``); only
# then the direct all-reduce may stand in the middle (``_tensor._run``).
NORM_REDUCE_BY_TRANSFORMS = {"_pre_reduce_transform", "_post_reduce_transform"} <= set(
    _NormPartial._reduce_value.__code__.co_names
)

def _clear_sharding_caches_by_hand() -> None:
    """Without torch's ``_clear_sharding_prop_cache``: its two caches, each where it exists."""
    _propagator.propagate_op_sharding.cache_clear()  # type: ignore[no-untyped-call]
    clear_fast_path = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_fast_path is not None:
        clear_fast_path()


# Empties torch's sharding caches, the Python one and the C++ fast path's (each decision made since
# is made again): torch's own "clear all" where it has one.
clear_sharding_caches: Callable[[], None] = getattr(
    torch.distributed.tensor.debug, "_clear_sharding_prop_cache", _clear_sharding_caches_by_hand
)

# Registers a collective's work with torch's work registry, where ``wait_tensor`` finds it; without
# it, asynchronous redistributions are left to torch.
register_work: Callable[[torch.Tensor, Any], None] | None = getattr(
    torch._C._distributed_c10d, "_register_work", None
)


def _calls_subclass_dispatch() -> bool:
    """Whether this torch calls a DTensor subclass's own ``__torch_dispatch__``, found by calling
    one aten op (``alias``, on a 1-element meta local) on a minimal subclass whose override records
    the call and raises.

    NOTE: decided by behaviour, not by version number: torch 2.12.1 and 2.13 call the override
    (``is_dtensor`` in python_arg_parser.cpp), torch 2.11 sends every DTensor subclass to its own
    C++ path. The probe needs no process group: its mesh is never initialised, so a torch that
    takes its own path fails on it (caught) before anything could run, and the answer is False.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    called: list[object] = []

    class _Probe(DTensor):
        @classmethod
        def __torch_dispatch__(  # type: ignore[override]
            cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            called.append(func)
            raise NotImplementedError("dtdispatch subclass-dispatch probe")

    try:
        local = torch.empty(1, device="meta")
        spec = DTensorSpec(
            DeviceMesh.__new__(DeviceMesh),
            (Replicate(),),
            tensor_meta=TensorMeta(local.shape, local.stride(), local.dtype),
        )
        probe = torch.Tensor._dtensor__new__(_Probe, local, spec, requires_grad=False)
        torch.ops.aten.alias.default(probe)
    except Exception:
        pass
    return bool(called)


# NOTE: when torch calls a DTensor subclass's __torch_dispatch__ (measured above), FastDTensor's
# override runs below autograd. Otherwise (torch 2.11, checked on the GPU machine and with its wheel
# on CPU) FastDTensor's __torch_dispatch__ is never called and outputs come back as stock DTensors.
# Its __torch_function__ still runs, so there dtdispatch works above dispatch only (ARCHITECTURE
# 'torch versions'): replayed calls stay on dtdispatch, everything else takes torch's path and its
# fresh outputs are retyped as FastDTensors (``_above.stock_call``).
SUBCLASS_DISPATCH = _calls_subclass_dispatch()


TO_LOCAL_KEEPS_PARAM = "_is_param" in DTensor.to_local.__code__.co_names
"""Whether stock's ``to_local`` of a Parameter(DTensor) returns a Parameter (torch gh-166156, in
2.13 and later; not in 2.12): read from what stock's method looks at, not from a version number."""

if hasattr(torch.compiler, "_compile_session_context"):
    is_compiling: Callable[[], bool] = torch.compiler.is_compiling
else:
    from torch._guards import CompileContext as _CompileContext

    def is_compiling() -> bool:
        """``torch.compiler.is_compiling()``, or a Dynamo compile in progress.

        NOTE: from torch 2.13 Dynamo holds ``torch.compiler.is_compiling()`` True for a whole
        compile session, so code it runs without tracing it (FastDTensor's handlers on fake
        tensors while Dynamo wraps a traced output, AOTAutograd's tracing) sees it. Before, the
        flag is only set for export; the compile context Dynamo enters says the same thing.
        """
        return torch.compiler.is_compiling() or _CompileContext.try_get() is not None


def skip_dynamo_frames(*functions: Callable[..., Any]) -> bool:
    """Make Dynamo run these functions, and every frame they call, uncompiled; False when this
    torch has no way to say so (then nothing changes).

    NOTE: torch's DTensor dispatch is C++ (and its Python helpers live in torch's own files);
    dtdispatch's entry points are Python frames that Dynamo intercepts like user code wherever it
    runs eager code under its frame hook: after a graph break (``implicit_replication()`` is one),
    in the part of a compiled function that falls back to eager. Compiling them there traces the
    dispatch machinery itself on fake tensors (unhashable SymInts in a key, data-dependent guards
    on version counters ...). A per-code execution strategy (skip this frame and, recursively,
    everything it calls) costs nothing per call, unlike ``torch.compiler.disable``'s wrapper; it
    is what Dynamo itself sets on code that hits its recompile limit.
    """
    eval_frame = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    set_strategy = getattr(eval_frame, "set_code_exec_strategy", None)
    strategy_type = getattr(eval_frame, "_FrameExecStrategy", None)
    action = getattr(eval_frame, "_FrameAction", None)
    if set_strategy is None or strategy_type is None or action is None:
        return False
    strategy = strategy_type(action.SKIP, action.SKIP)
    for function in functions:
        set_strategy(function.__code__, strategy)
    return True


def unsupported_reason(above_active: bool) -> str | None:
    """Why ``accelerate`` cannot opt tensors in on this torch, or None when it can."""
    if SUBCLASS_DISPATCH or above_active:
        return None
    return (
        f"torch {torch.__version__} never calls a DTensor subclass's __torch_dispatch__, and the "
        "path above dispatch is off (DTDISPATCH_ABOVE=0): tensors stay stock DTensors"
    )
