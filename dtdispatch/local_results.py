"""Turning torch's sharding decision into a Plan, and running a Plan (DESIGN §6-8).

``make_plan`` is the only place a decision becomes a cache value; ``execute`` is the Python executor
every plan can run on (the native path replays only the plans marked ``fast``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.tensor._random as dt_random
from torch._logging import LazyString  # type: ignore[attr-defined]  # re-exported without __all__
from torch._ops import OpOverload
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor._op_schema import OpInfo, OutputSharding
from torch.distributed.tensor._random import is_rng_supported_mesh
from torch.distributed.tensor._redistribute import redistribute_local_tensor
from torch.utils._python_dispatch import get_alias_info, return_and_correct_aliasing

from dtdispatch import _compat
from dtdispatch._tensor import FastDTensor
from dtdispatch.cache import EQUAL, INPLACE, NEW, OUT, VIEW, Plan

__all__ = ["execute", "make_plan", "random_ops", "wrap"]

aten = torch.ops.aten
_new = torch.Tensor._dtensor__new__


def random_ops() -> frozenset[OpOverload]:
    """torch's random-op set, read at run time (never a hand-kept copy)."""
    return frozenset(DTensor._op_dispatcher._random_ops)


_RANDOM_OPS = random_ops()


def _output_kind(op: OpOverload) -> int:
    """torch's classification (``OpSchema.is_inplace_op`` / ``is_out_variant_op`` /
    ``is_view_op``)."""
    schema = op._schema
    if schema.name[-1] == "_":
        return INPLACE
    if any(argument.is_out for argument in schema.arguments):
        return OUT
    if op == aten.equal.default:
        return EQUAL
    return VIEW if schema._is_view_op() else NEW


def _communicates(src: DTensorSpec, dst: DTensorSpec) -> bool:
    """Conservative: True unless every mesh dim is unchanged or Replicate -> Shard (a local
    chunk)."""
    if src.mesh != dst.mesh or (src.shard_order != dst.shard_order and len(src.placements) > 1):
        return True
    return any(
        s != d and not (s.is_replicate() and d.is_shard())
        for s, d in zip(src.placements, dst.placements, strict=False)
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes, for a bitwise comparison."""
    # NOTE: a fresh row-major copy: reshape(-1) keeps a stride of 0 for an expanded one-element
    # tensor (a backward's expanded ones), and view(uint8) refuses it (found by the fuzzer).
    if not t.numel():
        return t
    return t.reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)


def _local_chunk(
    local: torch.Tensor, src: DTensorSpec, dst: DTensorSpec
) -> tuple[int, int, int] | None:
    """(dim, offset, length) when src -> dst is one Replicate -> Shard(d) step that torch runs as
    a local chunk, verified against torch's ``redistribute_local_tensor`` on this very tensor;
    else None."""
    if src.mesh != dst.mesh or len(src.placements) != len(dst.placements):
        return None
    changed = [
        i for i, (s, d) in enumerate(zip(src.placements, dst.placements, strict=False)) if s != d
    ]
    if len(changed) != 1:
        return None
    mesh_dim = changed[0]
    s, d = src.placements[mesh_dim], dst.placements[mesh_dim]
    if not (s.is_replicate() and type(d) is Shard) or any(
        type(p) is not Shard for p in dst.placements if p.is_shard()
    ):
        return None
    coordinate = src.mesh.get_coordinate()
    if coordinate is None:
        return None
    dim = d.dim
    length, offset = _compat.local_shard_size_and_offset(
        local.size(dim), src.mesh.size(mesh_dim), coordinate[mesh_dim]
    )
    candidate = local.narrow(dim, offset, length).clone()
    reference = redistribute_local_tensor(local, src, dst)
    same = (
        candidate.shape == reference.shape
        and candidate.stride() == reference.stride()
        and candidate.dtype == reference.dtype
        and torch.equal(_bits(candidate), _bits(reference))
    )
    # NOTE: when in doubt the plan stays on the Python executor (a wrong chunk is a silent wrong
    # result).
    return (dim, int(offset), int(length)) if same else None


def make_plan(
    op: OpOverload, op_info: OpInfo, sharding: OutputSharding, *, cacheable: bool
) -> Plan:
    """The cache value for this decision (DESIGN §6). ``cacheable`` is False when the key does
    not pin every value the plan replays; such a plan is used once and never inserted."""
    participating = op_info.compute_mesh._is_current_rank_part_of_mesh()
    transforms: tuple[DTensorSpec | None, ...] | None = None
    rewritten: tuple[object, ...] | None = None
    op_call = op
    communicates = False
    chunks: tuple[tuple[int, int, int, int], ...] | None = None
    if sharding.needs_redistribute:
        schema = sharding.redistribute_schema
        if schema is None:
            raise AssertionError(f"{op}: needs_redistribute without a redistribute_schema")
        flat_target = (
            tuple(_flatten(schema.args_schema)[0])
            if op_info.args_tree_spec is not None
            else schema.args_schema
        )
        targets: list[DTensorSpec | None] = []
        for i, current in enumerate(op_info.flat_args_schema):
            target = flat_target[i]
            if isinstance(current, DTensorSpec) and current != target:
                targets.append(cast(DTensorSpec, target))
                communicates = communicates or _communicates(current, cast(DTensorSpec, target))
            else:
                targets.append(None)
        if any(t is not None for t in targets):
            transforms = tuple(targets)
            if not communicates and op_info.args_tree_spec is None:
                found = [
                    (
                        i,
                        _local_chunk(
                            cast(torch.Tensor, op_info.local_args[i]), cast(DTensorSpec, current), t
                        ),
                    )
                    for i, (current, t) in enumerate(
                        zip(op_info.flat_args_schema, targets, strict=False)
                    )
                    if t is not None
                ]
                if all(chunk is not None for _, chunk in found):
                    chunks = tuple((i, *cast(tuple[int, int, int], chunk)) for i, chunk in found)
        if sharding.use_val_from_redistribute_schema:
            # Non-tensor positions take the rewritten values (e.g. a sharded view's local shape);
            # extra values the rewrite appends come after the original positions.
            rewritten = tuple(flat_target)
        if schema.op != op:
            op_call = schema.op  # e.g. squeeze.default -> squeeze.dims
    kind = _output_kind(op)
    random = op in _RANDOM_OPS
    needs_pytree = op_info.args_tree_spec is not None
    spec = sharding.output_spec
    # NOTE: each condition below is something the native replay does not do. Widening the fast path
    # means teaching _native.dispatch (and the C mirror) the case first, then removing its line
    # here.
    if not cacheable:
        reason = "unkeyed rewrite"
    elif not participating:
        reason = "non-participating"
    elif random:
        reason = "random"
    elif transforms is not None and chunks is None:
        reason = "needs redistribution"
    elif rewritten is not None and needs_pytree:
        reason = "python-only plan"
    elif (
        kind == INPLACE
        and spec is not None
        and (
            not isinstance(spec, DTensorSpec)
            or op_info.flat_args_schema[0].placements != spec.placements
        )
    ):
        reason = "in-place placement change"
    elif kind == EQUAL:
        reason = "equal"
    else:
        reason = ""
    out_names = tuple(a.name for a in op._schema.arguments if a.is_out) if kind == OUT else ()
    alias_pairs = tuple(get_alias_info(op).read_only_alias_match_indexes) if kind == VIEW else ()
    return Plan(
        op_call=op_call,
        mesh=op_info.compute_mesh,
        output_spec=sharding.output_spec,
        kind=kind,
        transforms=transforms,
        communicates=communicates,
        rewritten_args=rewritten,
        needs_pytree=needs_pytree,
        random=random,
        participating=participating,
        fast=not reason,
        reason=reason,
        out_names=out_names,
        chunks=chunks,
        alias_pairs=alias_pairs,
    )


def wrap(result: object, spec: object) -> object:
    """torch's ``OpDispatcher.wrap``, producing FastDTensors."""
    if isinstance(result, torch.Tensor):
        if spec is None:
            if result.ndim != 0:
                raise AssertionError("output tensor should be scalar!")
            return result
        if not isinstance(spec, DTensorSpec):
            raise AssertionError(
                f"output spec does not match with output! Expected DTensorSpec, got {spec}."
            )
        return _new(FastDTensor, result, spec, requires_grad=result.requires_grad)
    if isinstance(result, (list, tuple)):
        if not isinstance(spec, (list, tuple)):
            raise AssertionError(
                f"output spec does not match with output! Expected list/tuple, got {spec}."
            )
        wrapped = [wrap(r, s) for r, s in zip(result, spec, strict=False)]
        return tuple(wrapped) if isinstance(result, tuple) else wrapped
    return result


def _default_tensor(spec: DTensorSpec) -> torch.Tensor:
    meta = spec.tensor_meta
    if meta is None:
        raise RuntimeError(f"{spec} has no tensor metadata.")
    if len(meta.shape) == 0:
        return torch.zeros((), dtype=meta.dtype)
    return torch.tensor([], dtype=meta.dtype)


def _non_participating_results(op: OpOverload, spec: object) -> object:
    """DESIGN §7: no compute, no collectives; None / 0-d zeros / empty (0,) per output spec."""
    if spec is None:
        return None
    if isinstance(spec, DTensorSpec):
        return _default_tensor(spec)
    if isinstance(spec, Sequence):
        results = [_default_tensor(s) if s is not None else None for s in spec]
        if None in results:
            # NOTE: RuntimeError, as stock's C++ path raises for every non-participating call
            # (torch's Python twin of this code says NotImplementedError, but stock never runs it
            # here; e.g. native_layer_norm_backward, found by the fuzzer).
            raise RuntimeError(
                f"{op}: return type {op._schema.returns[0].type} in DTensor op is not supported"
            )
        return results
    raise AssertionError(f"{op}: unexpected output spec {spec!r}")


def _flatten(args: tuple[Any, ...]) -> tuple[list[Any], list[Any]]:
    """``pytree.tree_flatten(args)`` for aten argument tuples, without pytree's cost.

    aten arguments nest one level (``Tensor[]``, ``Tensor?[]``, ``int[]``). Like pytree, ``None`` is
    a node without leaves, so it is not in ``flat``: torch's plan indices (``flat_args_schema``)
    count this way. ``shape`` records how to rebuild: None, "leaf", or (list/tuple type, per-element
    is-None flags).
    """
    flat: list[Any] = []
    shape: list[Any] = []
    for arg in args:
        if arg is None:
            shape.append(None)
        elif type(arg) is list or type(arg) is tuple:
            flags = tuple(e is None for e in arg)
            if any(type(e) is list or type(e) is tuple for e in arg):
                raise NotImplementedError("dtdispatch: nested list arguments are not supported")
            flat.extend(e for e in arg if e is not None)
            shape.append((type(arg), flags))
        else:
            flat.append(arg)
            shape.append("leaf")
    return flat, shape


def _unflatten(flat: list[Any], shape: list[Any]) -> list[Any]:
    """The inverse of ``_flatten`` (extra trailing leaves, from a rewrite, are appended)."""
    out: list[Any] = []
    it = iter(flat)
    for entry in shape:
        if entry is None:
            out.append(None)
        elif entry == "leaf":
            out.append(next(it))
        else:
            kind, flags = entry
            out.append(kind(None if is_none else next(it) for is_none in flags))
    out.extend(it)
    return out


def _local_args(plan: Plan, op: OpOverload, args: tuple[Any, ...]) -> tuple[list[Any], Any]:
    """Flattened positional args with DTensors unwrapped, redistributed and rewritten per the
    plan."""
    if plan.needs_pytree:
        flat, tree = _flatten(args)
    else:
        flat, tree = list(args), None
    transforms = plan.transforms
    rewritten = plan.rewritten_args
    local: list[Any] = []
    for i, arg in enumerate(flat):
        if isinstance(arg, DTensor):
            tensor = arg._local_tensor
            target = transforms[i] if transforms is not None else None
            if target is not None:
                if _compat.ExplicitRedistributionContext is not None:
                    _compat.ExplicitRedistributionContext.observe_redistribution(
                        arg._spec,
                        target,
                        # torch passes an OpOverload here too; its annotation says OpSchema
                        LazyString(_compat.format_implicit_redistribution_msg, op),  # type: ignore[arg-type]
                    )
                tensor = redistribute_local_tensor(tensor, arg._spec, target)
            local.append(tensor)
        elif rewritten is not None and not isinstance(arg, torch.Tensor):
            local.append(rewritten[i])
        else:
            local.append(arg)
    if rewritten is not None:
        local.extend(rewritten[len(flat) :])
    return local, tree


def _run_random(
    op: OpOverload,
    args: tuple[Any, ...],
    local_args: Sequence[Any],
    local_kwargs: dict[str, Any],
    mesh: Any,
) -> object:
    """torch's random-op branch of ``_dispatch_get_local_results_slow_path``, line for line."""
    if not dt_random._rng_tracker and is_rng_supported_mesh(mesh):
        dt_random._rng_tracker = dt_random.OffsetBasedRNGTracker(mesh, True)
    first_arg = cast(DTensor, args[0])
    first_local = cast(torch.Tensor, local_args[0])
    generator = local_kwargs.pop("generator", None)
    tracker = dt_random._rng_tracker
    if tracker and not first_local.is_meta and tracker.distribute_region_enabled:
        if (
            _compat.run_dtensor_rng_op is None
            or generator is not None
            or first_local.device.type != "cuda"
            or type(first_local) is not torch.Tensor
        ):
            with tracker._distribute_region(first_arg._spec, generator=generator):
                return op(*local_args, **local_kwargs)
        if not isinstance(tracker, dt_random.OffsetBasedRNGTracker):
            raise AssertionError
        start, end = tracker._compute_rng_offsets(first_arg._spec)
        return _compat.run_dtensor_rng_op(start, end, op, *local_args, **local_kwargs)
    return op(*local_args, **local_kwargs)


def execute(plan: Plan, op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
    """Run ``plan`` for this call: local results, then the output kind's return semantics."""
    if plan.participating:
        local_args, tree = _local_args(plan, op, args)
        call_args = _unflatten(local_args, tree) if tree is not None else local_args
        local_kwargs = {
            k: (v._local_tensor if isinstance(v, DTensor) else v) for k, v in kwargs.items()
        }
        if plan.random:
            local_results = _run_random(op, args, call_args, local_kwargs, plan.mesh)
        else:
            local_results = plan.op_call(*call_args, **local_kwargs)
    else:
        local_results = _non_participating_results(op, plan.output_spec)
    return _finish(plan, op, args, kwargs, local_results)


def _finish(
    plan: Plan, op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], local_results: object
) -> object:
    """torch's ``_dispatch_fast_path_python_tail`` plus its C++ wrap, with FastDTensor outputs."""
    kind = plan.kind
    spec = plan.output_spec
    if kind == EQUAL and spec is None:
        # NOTE: like stock, every rank of the default group joins this all-reduce (participating or
        # not); skipping it on a non-participating rank would hang the others.
        if not (local_results is None or isinstance(local_results, bool)):
            raise AssertionError
        flag = torch.tensor(
            int(local_results) if local_results is not None else 1, device=plan.mesh.device_type
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    if kind == INPLACE:
        if spec is None:
            return None
        self_arg = cast(DTensor, args[0])
        if self_arg._spec.placements == spec.placements:
            return self_arg
        self_arg._spec = spec
        return return_and_correct_aliasing(op, args, kwargs, self_arg)  # type: ignore[no-untyped-call]  # torch: untyped
    if kind == OUT:
        specs = spec if isinstance(spec, tuple) else (spec,)
        outs: list[DTensor] = []
        for argument in op._schema.arguments:
            if argument.is_out:
                out = cast(DTensor, kwargs[argument.name])
                out._spec = cast(DTensorSpec, specs[len(outs)])
                outs.append(out)
        if not outs:
            raise AssertionError("out variant should have at least one out arg")
        return tuple(outs) if len(outs) > 1 else outs[0]
    result = wrap(local_results, spec)
    if kind == VIEW and plan.participating:
        return return_and_correct_aliasing(op, args, kwargs, result)  # type: ignore[no-untyped-call]  # torch: untyped
    return result
