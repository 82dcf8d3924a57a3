"""Turning torch's sharding decision into a DispatchPlan, and running a DispatchPlan (ARCHITECTURE
"The plan", "Ranks outside the mesh", "Random ops").

``make_plan`` is the only place a decision becomes a cache value; ``execute`` is the Python executor
every plan can run on (the native path replays only the plans marked ``fast``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.tensor._random as dt_random
from torch._logging import LazyString  # type: ignore[attr-defined]  # re-exported without __all__
from torch._ops import OpOverload
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._op_schema import OpInfo, OutputSharding
from torch.distributed.tensor._random import is_rng_supported_mesh
from torch.distributed.tensor._redistribute import redistribute_local_tensor
from torch.distributed.tensor.placement_types import _MaskPartial
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    get_alias_info,
    return_and_correct_aliasing,
)

from dtdispatch import _compat
from dtdispatch import cache as _cache
from dtdispatch._bitwise import same_bits
from dtdispatch._tensor import AutogradFastDTensor, FastDTensor, redistribute_argument
from dtdispatch.cache import EQUAL, INPLACE, NEW, OUT, VIEW, DispatchPlan

__all__ = ["execute", "make_plan", "random_ops", "verified_local_call", "wrap"]

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


def _no_op_transform(local: object, src: DTensorSpec, dst: DTensorSpec) -> bool:
    """Whether torch's redistribution from ``src`` to ``dst`` hands the local tensor back as it is:
    only mesh dimensions of size 1 change placement (torch skips those: one rank holds the whole
    dimension), checked once against ``redistribute_local_tensor`` (the same object back).

    NOTE: such a transform (Replicate -> Partial for a rowwise bias on a 1-rank tensor-parallel
    dim, say) would otherwise send the plan to the Python executor on every call.
    """
    if (
        not isinstance(local, torch.Tensor)
        or src.mesh != dst.mesh
        or src.shard_order != dst.shard_order
        or len(src.placements) != len(dst.placements)
    ):
        return False
    sizes = src.mesh.shape
    if any(
        s != d and sizes[i] != 1
        for i, (s, d) in enumerate(zip(src.placements, dst.placements, strict=True))
    ):
        return False
    # No mesh dim of size > 1 changes: torch's function communicates nothing here.
    return redistribute_local_tensor(local, src, dst) is local


def _communicates(src: DTensorSpec, dst: DTensorSpec) -> bool:
    """Conservative: True unless every mesh dim is unchanged or Replicate -> Shard (a local
    chunk)."""
    if src.mesh != dst.mesh or (src.shard_order != dst.shard_order and len(src.placements) > 1):
        return True
    return any(
        s != d and not (s.is_replicate() and d.is_shard())
        for s, d in zip(src.placements, dst.placements, strict=False)
    )


def _local_chunk(
    local: torch.Tensor, src: DTensorSpec, dst: DTensorSpec
) -> tuple[int, int, int | None] | None:
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
    reference = redistribute_local_tensor(local, src, dst)
    if reference is local:
        # NOTE: torch hands this very tensor back (the mesh dim has size 1): length None replays
        # it as is. A copy would drop what an op writes through it (native_batch_norm's running
        # stats, which its schema does not even mark as mutated).
        return (dim, 0, None)
    candidate = local.narrow(dim, offset, length).clone()
    same = (
        candidate.shape == reference.shape
        and candidate.stride() == reference.stride()
        and candidate.dtype == reference.dtype
        and same_bits(candidate, reference)
    )
    # NOTE: when in doubt the plan stays on the Python executor (a wrong chunk is a silent wrong
    # result).
    return (dim, int(offset), int(length)) if same else None


def make_plan(
    op: OpOverload, op_info: OpInfo, sharding: OutputSharding, *, cacheable: bool
) -> DispatchPlan:
    """The cache value for this decision (ARCHITECTURE "The plan"). ``cacheable`` is False when the
    key does
    not pin every value the plan replays; such a plan is used once and never inserted."""
    participating = op_info.compute_mesh._is_current_rank_part_of_mesh()
    transforms: tuple[DTensorSpec | None, ...] | None = None
    rewritten: tuple[object, ...] | None = None
    op_call = op
    communicates = False
    chunks: tuple[tuple[int, int, int, int | None], ...] | None = None
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
            if (
                isinstance(current, DTensorSpec)
                and current != target
                and not _no_op_transform(op_info.local_args[i], current, cast(DTensorSpec, target))
            ):
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
                            cast(torch.Tensor, op_info.local_args[i]),
                            cast(DTensorSpec, current),
                            t,
                        ),
                    )
                    for i, (current, t) in enumerate(
                        zip(op_info.flat_args_schema, targets, strict=False)
                    )
                    if t is not None
                ]
                if all(chunk is not None for _, chunk in found):
                    chunks = tuple(
                        (i, *cast(tuple[int, int, int | None], chunk)) for i, chunk in found
                    )
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
    masks = (
        _created_masks(op_info.flat_args_schema, transforms) if transforms is not None else ()
    )
    # NOTE: each condition below is something the native replay does not do. Widening the fast path
    # means teaching _native.dispatch (and the C mirror) the case first, then removing its line
    # here.
    if not cacheable:
        reason = "unkeyed rewrite"
    elif not participating:
        reason = "non-participating"
    elif random:
        reason = "random"
    elif masks:
        reason = "mask per call"
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
    local_call = None
    if not reason and kind in (NEW, VIEW) and not needs_pytree and not op_info.local_kwargs:
        local_call = verified_local_call(
            op, op_call, _replay_locals(list(op_info.local_args), rewritten, chunks), rewritten
        )
    return DispatchPlan(
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
        masks=masks,
        local_call=local_call,
    )


def _created_masks(
    current: Sequence[object], targets: Sequence[DTensorSpec | None]
) -> tuple[_MaskPartial, ...]:
    """The ``_MaskPartial`` placements that this plan's redistributions create (in a target spec,
    not in the argument's own spec): each holds a mask buffer that the redistribution fills and the
    output's later reduction consumes, i.e. per-call state."""
    found: list[_MaskPartial] = []
    for source, target in zip(current, targets, strict=False):
        if target is None:
            continue
        for placement in target.placements:
            if (
                isinstance(placement, _MaskPartial)
                and placement not in cast(DTensorSpec, source).placements
                and not any(placement is m for m in found)
            ):
                found.append(placement)
    return tuple(found)


def _fresh_masks(plan: DispatchPlan) -> DispatchPlan:
    """``plan`` with each of ``plan.masks`` replaced by a new ``_MaskPartial`` (same reduce op,
    offset shape and dim; an empty mask buffer of its own) in the transforms and the output spec.

    NOTE: torch's embedding (and gather) rule puts one ``_MaskPartial`` object in the index
    argument's target and in the output spec, so the mask the index redistribution materializes is
    the one the output's reduction applies. torch caches that object with the decision, so every
    call shares one buffer, and a second lookup before the first output is reduced raises
    "MaskBuffer has been materialized with conflicting data". Replacing the object once per call,
    the same new object in both places, gives each output its own mask and keeps the cached plan
    free of per-call state.
    """
    fresh: dict[int, _MaskPartial] = {
        id(m): _MaskPartial(  # type: ignore[no-untyped-call]  # torch: untyped __init__
            reduce_op=m.reduce_op, offset_shape=m.offset_shape, offset_dim=m.offset_dim
        )
        for m in plan.masks
    }

    def respec(spec: Any) -> Any:
        if isinstance(spec, DTensorSpec):
            if not any(id(p) in fresh for p in spec.placements):
                return spec
            new = copy.copy(spec)
            # DTensorSpec.__setattr__ drops the cached hash when placements change.
            new.placements = tuple(fresh.get(id(p), p) for p in spec.placements)
            return new
        if isinstance(spec, (list, tuple)):
            return type(spec)(respec(s) for s in spec)
        return spec

    transforms = plan.transforms
    return dataclasses.replace(
        plan,
        transforms=tuple(respec(t) for t in transforms) if transforms is not None else None,
        output_spec=respec(plan.output_spec),
    )


def _replay_locals(
    local_args: list[Any],
    rewritten: tuple[object, ...] | None,
    chunks: tuple[tuple[int, int, int, int | None], ...] | None,
) -> list[Any]:
    """The positional arguments the native path hands the local op for this call (the unwrap block
    of ``_native.dispatch``, from torch's already unwrapped ``local_args``)."""
    if rewritten is not None:
        local_args = [
            a if isinstance(a, torch.Tensor) else rewritten[i] for i, a in enumerate(local_args)
        ]
        local_args.extend(rewritten[len(local_args) :])
    for index, dim, offset, length in chunks or ():
        if length is not None:  # None: torch hands the local itself back (_local_chunk)
            local_args[index] = local_args[index].narrow(dim, offset, length).clone()
    return local_args


class _Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch: __init_subclass__ is untyped
    """Records every aten call that reaches the Python dispatch key, then runs it."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch: untyped
        self.calls: list[tuple[OpOverload, tuple[Any, ...], dict[str, Any]]] = []

    def __torch_dispatch__(
        self,
        func: OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _same_value(a: object, b: object) -> bool:
    """Tensors by identity; everything else by exact type and ``==``, element by element."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        b_seq = cast(Sequence[object], b)
        return len(a) == len(b_seq) and all(
            _same_value(x, y) for x, y in zip(a, b_seq, strict=True)
        )
    return bool(a == b)


def _same_output(a: object, b: object, *, view: bool) -> bool:
    """Bitwise the same result: type, storage offset, ``requires_grad``, ``same_bits`` (and, for
    views, the same storage)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = (
            type(a) is type(b)
            and a.shape == b.shape
            and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset()
            and a.dtype == b.dtype
            and a.device == b.device
            and a.requires_grad == b.requires_grad
            and (not view or a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
        )
        return same and same_bits(a, b)
    if isinstance(a, (list, tuple)):
        b_seq = cast(Sequence[object], b)
        return (
            type(a) is type(b)
            and len(a) == len(b_seq)
            and all(_same_output(x, y, view=view) for x, y in zip(a, b_seq, strict=True))
        )
    return type(a) is type(b) and bool(a == b)


def _key_pins_argument_types(
    op: OpOverload, local_args: Sequence[Any], rewritten: tuple[object, ...] | None
) -> bool:
    """True when every call that hits this plan's key hands the local op positional arguments that
    torch's Python argument parser reads the same way as ``local_args``.

    The parser picks an overload from the Python types of the arguments, so each position's type
    must be fixed by the key: a tensor of at least one dimension (a DTensor's spec fixes its
    local's rank), a value the plan itself supplies (``rewritten``), None, or a scalar of a
    ``scalar_value_free_ops`` op (keyed by its exact type). Anything keyed by value is not pinned
    (``1 == 1.0 == True`` share a key), nor is a 0-dim tensor: the parser may read one as a Scalar
    depending on ``requires_grad``, which no key holds. Tensors must be plain ``torch.Tensor``s (a
    subclass's ``__torch_function__`` would see the public function instead of the aten op; the
    native path checks this again per call, as the key does not hold the local's type).
    """
    value_free = op in _cache._VALUE_FREE_OPS
    static_argnum = _cache.schema_info(op).static_argnum
    for index, value in enumerate(local_args):
        if isinstance(value, torch.Tensor):
            if value.ndim == 0 or type(value) is not torch.Tensor:
                return False
        elif not (
            rewritten is not None
            or value is None
            # keyed (index >= static_argnum), and by type
            or (value_free and index >= static_argnum and type(value) in _cache._SCALAR_TYPES)
        ):
            return False
    return True


def _public_callables(op: OpOverload) -> list[Callable[..., Any]]:
    """The public functions named like ``op``: ``torch._C._VariableFunctions`` (the ``torch.*``
    functions), then the ``Tensor`` method (called with self first)."""
    namespace, _, name = op._schema.name.partition("::")
    if namespace != "aten":
        return []
    found = []
    for owner in (torch._C._VariableFunctions, torch._C.TensorBase):
        candidate = getattr(owner, name, None)
        if callable(candidate) and not isinstance(candidate, type):
            found.append(candidate)
    return found


def verified_local_call(
    op: OpOverload,
    op_call: OpOverload,
    local_args: list[Any],
    rewritten: tuple[object, ...] | None,
) -> Callable[..., Any] | None:
    """A public function that provably runs ``op_call`` on ``local_args`` as ``op_call._op`` does,
    or None.

    Both run once on these very arguments under a recording dispatch mode: accepted only when each
    dispatches exactly one aten call, ``op_call``, with identical arguments (tensors by identity,
    other values by type and value) and the results are bitwise the same. That holds for every
    later call with the plan's key only when the key pins how the public function's parser reads
    each argument (``_key_pins_argument_types``). ``op`` must not mutate its inputs.
    NOTE: when in doubt, None: the plan then calls ``op_call`` as before (a wrong overload is a
    silent wrong result).
    """
    if (
        op_call._schema.is_mutable
        # A seeded op outside torch's random-op set (aten.dropout under inference mode): the two
        # verification calls would draw from the generator, and their results differ anyway.
        or torch.Tag.nondeterministic_seeded in op_call.tags
        or not _key_pins_argument_types(op, local_args, rewritten)
        # A user's mode would see the verification calls (and a torch function mode would see the
        # public call): plan without the shortcut.
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
    ):
        return None
    view = _output_kind(op_call) == VIEW
    for candidate in _public_callables(op_call):
        reference, observed = _Recorder(), _Recorder()
        try:
            with reference:
                expected = op_call._op(*local_args)
        except Exception:  # execute() raises it for the user; no shortcut
            return None
        try:
            with observed:
                got = candidate(*local_args)
        except Exception:  # this candidate does not take these arguments
            continue
        if (
            len(reference.calls) == 1
            and len(observed.calls) == 1
            and reference.calls[0][0] is op_call
            and observed.calls[0][0] is op_call
            and _same_value(reference.calls[0][1], observed.calls[0][1])
            and _same_value(
                sorted(reference.calls[0][2].items()), sorted(observed.calls[0][2].items())
            )
            and _same_output(expected, got, view=view)
        ):
            return candidate
    return None


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
    """ARCHITECTURE "Ranks outside the mesh": no compute, no collectives; None / 0-d zeros / empty
    (0,) per output spec."""
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


def _replicate_spec(mesh: Any, tensor: torch.Tensor) -> DTensorSpec:
    """torch's spec for a plain tensor argument
    (``OpDispatcher._try_replicate_spec_for_scalar_tensor``, without its checks: the plan was made
    from this very spec)."""
    return DTensorSpec(
        mesh,
        (Replicate(),) * mesh.ndim,
        tensor_meta=TensorMeta(shape=tensor.shape, stride=tensor.stride(), dtype=tensor.dtype),
    )


def _local_args(plan: DispatchPlan, op: OpOverload, args: tuple[Any, ...]) -> tuple[list[Any], Any]:
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
                tensor = redistribute_argument(tensor, arg._spec, target)
            local.append(tensor)
        elif (
            isinstance(arg, torch.Tensor)
            and transforms is not None
            and (target := transforms[i]) is not None
        ):
            # A plain tensor (one element, or any under implicit replication) is Replicate to
            # torch, which redistributes it like a DTensor argument (redistribute_local_args).
            source = _replicate_spec(plan.mesh, arg)
            if _compat.ExplicitRedistributionContext is not None:
                _compat.ExplicitRedistributionContext.observe_redistribution(
                    source,
                    target,
                    LazyString(_compat.format_implicit_redistribution_msg, op),  # type: ignore[arg-type]
                )
            local.append(redistribute_local_tensor(arg, source, target))
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


def execute(
    plan: DispatchPlan, op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> object:
    """Run ``plan`` for this call: local results, then the output kind's return semantics."""
    if plan.masks:
        plan = _fresh_masks(plan)
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


def _autograd_role(
    op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], *, view: bool
) -> bool:
    """Whether the call's fresh outputs take the autograd role (ARCHITECTURE "Two roles: replay
    and autograd"), as the native path's block "role" decides it: a view takes its base's role
    (``args[0]``); other outputs take it when an argument is in it and grad mode is on, a backward
    pass runs, or every DTensor argument is in it."""
    if view:
        return bool(args) and type(args[0]) is AutogradFastDTensor
    in_role, every = False, True
    for a in (*args, *kwargs.values()):
        for e in a if type(a) is list or type(a) is tuple else (a,):
            if isinstance(e, DTensor):
                if type(e) is AutogradFastDTensor:
                    in_role = True
                else:
                    every = False
    if not in_role:
        return False
    return torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1 or every


def _to_autograd_role(result: object) -> None:
    """Put the fresh FastDTensors in ``result`` in the autograd role, in place."""
    if type(result) is FastDTensor:
        result.__class__ = AutogradFastDTensor
    elif type(result) is tuple or type(result) is list:
        for r in result:
            _to_autograd_role(r)


def _finish(
    plan: DispatchPlan,
    op: OpOverload,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    local_results: object,
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
    if _autograd_role(op, args, kwargs, view=kind == VIEW):
        _to_autograd_role(result)
    if kind == VIEW and plan.participating:
        return return_and_correct_aliasing(op, args, kwargs, result)  # type: ignore[no-untyped-call]  # torch: untyped
    return result
