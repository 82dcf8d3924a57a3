"""The torch internals dtdispatch reads whose names moved between the supported releases (2.11–2.13).

NOTE: every lookup of a private torch name that is not in all supported releases goes through here, so the
version differences sit in one place and the rest of the code reads as if only torch 2.13 existed.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

__all__ = [
    "dtensor_new",
    "ExplicitRedistributionContext",
    "explicit_redistribution_local",
    "format_implicit_redistribution_msg",
    "local_shard_size_and_offset",
    "run_dtensor_rng_op",
    "single_dim_schema_infos",
    "single_dim_strategy_funcs",
]

_propagator = DTensor._op_dispatcher.sharding_propagator

# Ops registered through single-dim strategies keep their RuntimeSchemaInfo (and rule) in separate tables.
single_dim_schema_infos: dict[Any, Any] = getattr(_propagator, "op_to_schema_info_for_single_dim_strategy", {})
single_dim_strategy_funcs: dict[Any, Any] = getattr(_propagator, "op_single_dim_strategy_funcs", {})

try:
    from torch.distributed.tensor._utils import (  # type: ignore[attr-defined]
        ExplicitRedistributionContext,
        _format_implicit_redistribution_msg as format_implicit_redistribution_msg,
    )

    explicit_redistribution_local: Any = ExplicitRedistributionContext._local
except ImportError:  # no explicit-redistribution mode in this torch: nothing to observe
    ExplicitRedistributionContext = None  # type: ignore[assignment,misc]
    format_implicit_redistribution_msg = None  # type: ignore[assignment]
    explicit_redistribution_local = threading.local()

try:
    from torch._prims.rng_prims import run_dtensor_rng_op  # type: ignore[attr-defined]
except ImportError:  # older torch runs every random op under _distribute_region
    run_dtensor_rng_op = None

local_shard_size_and_offset = getattr(Shard, "local_shard_size_and_offset", None) or getattr(
    Shard, "_local_shard_size_and_offset"
)

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def _wrapper_new(cls: type, local: torch.Tensor, spec: Any, *, requires_grad: bool) -> Any:
    if cls is DTensor:
        return torch.Tensor._dtensor__new__(cls, local, spec, requires_grad=requires_grad)
    r = torch.Tensor._make_wrapper_subclass(
        cls, spec.shape, strides=spec.stride, dtype=local.dtype, device=local.device, layout=local.layout,
        requires_grad=requires_grad,
    )
    r._spec = spec
    r._local_tensor = local
    return r


# NOTE: torch 2.13 sends ops on a DTensor subclass that overrides __torch_dispatch__ to that override. Older
# releases route every tensor built by _dtensor__new__ (it carries the DTensor dispatch key) straight into
# torch's C++ DTensor path, so the override never runs and outputs come back as stock DTensors. There the
# FastDTensor is built as a plain wrapper subclass (Python dispatch key): same slots, same behaviour, slower to
# construct (and an op mixing it with stock DTensors may still take torch's path).
dtensor_new: Any = torch.Tensor._dtensor__new__ if _TORCH_VERSION >= (2, 13) else _wrapper_new
