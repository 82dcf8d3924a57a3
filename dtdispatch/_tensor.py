"""The dtdispatch tensor: a DTensor whose ops dispatch through dtdispatch (ARCHITECTURE "How ops
reach dtdispatch")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, SupportsIndex, cast

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._api import _normalize_placements_for_grad
from torch.distributed.tensor._api import _ToTorchTensor as _TorchToTorchTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._ops._math_ops import _NormPartial
from torch.distributed.tensor._redistribute import redistribute_local_tensor
from torch.distributed.tensor._utils import assert_no_mixed_partial_types
from torch.distributed.tensor.placement_types import Placement, _StridedShard
from torch.utils.hooks import warn_if_has_hooks

from dtdispatch import _collectives, _compat

__all__ = [
    "FAST_TYPES",
    "AutogradFastDTensor",
    "FastDTensor",
    "as_fast",
    "as_stock",
    "redistribute_argument",
    "role",
]

_new = torch.Tensor._dtensor__new__
_compiling = torch.compiler.is_compiling


class _FastDTensorBase(DTensor):
    """What both roles share (``FastDTensor`` and ``AutogradFastDTensor``, siblings under it)."""

    __slots__ = ()

    # NOTE: __torch_dispatch__ is installed by dtdispatch._dispatcher (the native entry point, C or
    # its Python twin), so that the hot path does not pay for an extra Python frame here.

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"FastDTensor(local_tensor={self._local_tensor}, device_mesh={self._spec.mesh}, "
            f"placements={self._spec.placements})"
        )

    def redistribute(
        self,
        device_mesh: DeviceMesh | None = None,
        placements: Sequence[Placement] | None = None,
        *,
        async_op: bool = False,
        forward_dtype: torch.dtype | None = None,
        backward_dtype: torch.dtype | None = None,
    ) -> FastDTensor:
        """``DTensor.redistribute`` with a cached plan; same values, spec and autograd as stock.

        Nothing moves when the placements do not change (a new FastDTensor on the same local shard
        and spec, as stock returns); Replicate -> Shard on a 1-D mesh is a local chunk; other
        transforms go through torch's ``redistribute_local_tensor``. dtype casts, another mesh and
        tracing take torch's own method.

        Args:
            device_mesh: the target mesh; None or this tensor's mesh keeps it.
            placements: the target placements, one per mesh dimension (None raises, as on stock).
            async_op: leave the collectives asynchronous (as stock).
            forward_dtype: cast the local tensor before redistributing (as stock).
            backward_dtype: the gradient's dtype for the backward redistribution (as stock).

        Returns:
            A FastDTensor with the target placements; its gradient flows back as stock's.
        """
        spec = self._spec
        dtype = self._local_tensor.dtype
        if (
            placements is None
            or (device_mesh is not None and device_mesh is not spec.mesh)
            or (forward_dtype is not None and forward_dtype != dtype)
            or (backward_dtype is not None and backward_dtype != dtype)
            or _compiling()
        ):
            return _stock_call(
                DTensor.redistribute,
                self,
                device_mesh,
                placements,
                async_op=async_op,
                forward_dtype=forward_dtype,
                backward_dtype=backward_dtype,
            )
        key = (spec, placements if type(placements) is tuple else tuple(placements))
        plan = _forward_plans.get(key, _MISSING)
        if plan is _MISSING:
            plan = _redistribute_plan(spec, key[1], ndim=self.ndim)
            _remember(_forward_plans, key, plan)
        if plan is None:
            return _stock_call(
                DTensor.redistribute, self, device_mesh, placements, async_op=async_op
            )
        if torch.is_grad_enabled() and self.requires_grad:
            return _apply_redistribute(self, plan, async_op)  # type: ignore[no-any-return]
        local = self._local_tensor
        if local.requires_grad and torch.is_grad_enabled():
            # NOTE: stock's Function runs the transform with grad mode off; a local that requires
            # grad (from_local of a leaf under no_grad) would otherwise record a graph here.
            with torch.no_grad():
                local = _run(plan, local, spec, async_op=async_op, explicit=True)
        else:
            local = _run(plan, local, spec, async_op=async_op, explicit=True)
        # NOTE: stock's autograd Function builds its output with the input's requires_grad; grad
        # mode off clears it, inference mode keeps it.
        requires_grad = self.requires_grad and torch.is_inference_mode_enabled()
        # The output keeps this tensor's role, as a dispatch-path call on one FastDTensor does
        # (ARCHITECTURE "Two roles: replay and autograd").
        autograd = requires_grad or type(self) is AutogradFastDTensor
        return _new(role(autograd), local, plan.target, requires_grad=requires_grad)

    def to_local(self, *, grad_placements: Sequence[Placement] | None = None) -> torch.Tensor:
        """``DTensor.to_local``; its backward hands on a FastDTensor gradient (stock's builds a
        plain DTensor, so every backward op on it alone would leave dtdispatch).

        Args:
            grad_placements: the placements of the gradient this local tensor will receive
                (default: this tensor's own), as stock.

        Returns:
            This rank's local tensor: the shard itself with grad mode off, else a view of it that
            autograd connects to this tensor, as stock returns.
        """
        if _compiling():
            return DTensor.to_local(compiled_fast(self), grad_placements=grad_placements)
        if not torch.is_grad_enabled():
            result = self._local_tensor
        elif self.requires_grad:
            if grad_placements is not None and type(grad_placements) is not tuple:
                grad_placements = tuple(grad_placements)
            result = _apply_to_torch(self, grad_placements)
        else:
            # NOTE: stock runs its autograd Function here too, whose forward returns this fresh
            # view (never the local shard itself, which autograd metadata must not touch), with
            # grad mode off.
            result = _fresh_view(self._local_tensor)
        # Stock's gh-166156: the local tensor of a Parameter(DTensor) is a Parameter too.
        if (
            _compat.TO_LOCAL_KEEPS_PARAM
            and getattr(self, "_is_param", False)
            and not getattr(result, "_is_param", False)
        ):
            if result is self._local_tensor:
                result = result.view_as(result)
            result._is_param = True
        return result

    def full_tensor(self, *, grad_placements: Sequence[Placement] | None = None) -> torch.Tensor:
        """``DTensor.full_tensor``: redistribute to Replicate everywhere, then the local tensor (a
        fresh view, as stock's autograd Function returns even without grad).

        Args:
            grad_placements: the placements of the gradient the full tensor will receive
                (default: replicated), as stock.

        Returns:
            The global tensor (a plain tensor), on every rank of the mesh.
        """
        if _compiling():
            return DTensor.full_tensor(compiled_fast(self), grad_placements=grad_placements)
        full = self.redistribute(placements=_replicated(self._spec.mesh.ndim), async_op=False)
        if torch.is_grad_enabled() and full.requires_grad:
            if grad_placements is not None and type(grad_placements) is not tuple:
                grad_placements = tuple(grad_placements)  # stock's backward treats both alike
            return _apply_to_torch(full, grad_placements)  # type: ignore[no-any-return]
        return _fresh_view(full._local_tensor)

    @staticmethod
    def from_local(
        local_tensor: torch.Tensor,
        device_mesh: DeviceMesh | None = None,
        placements: Sequence[Placement] | None = None,
        *,
        run_check: bool = False,
        shape: torch.Size | None = None,
        stride: tuple[int, ...] | None = None,
        grad_placements: Sequence[Placement] | None = None,
    ) -> FastDTensor:
        """``DTensor.from_local`` that returns a FastDTensor (same spec, values and autograd as
        stock). The spec is cached per (mesh, placements, local layout, shape, stride); run_check,
        an implicit mesh, another device and ranks outside the mesh take torch's own function.

        Args:
            local_tensor: this rank's shard.
            device_mesh: the mesh (None: torch's current mesh).
            placements: one per mesh dimension (None: Replicate everywhere).
            run_check: check metadata across ranks (a collective), as stock.
            shape: the global shape (None: computed from the local shape, assuming even shards).
            stride: the global stride (None: computed likewise).
            grad_placements: the placements of the gradient handed back to ``local_tensor``.

        Returns:
            A FastDTensor on ``local_tensor`` (or a view of it, as stock).
        """
        if run_check or device_mesh is None or isinstance(local_tensor, DTensor) or _compiling():
            return _stock_from_local(
                local_tensor, device_mesh, placements, run_check, shape, stride, grad_placements
            )
        try:
            key = (
                id(device_mesh),
                placements
                if placements is None or type(placements) is tuple
                else tuple(placements),
                local_tensor.shape,
                local_tensor.stride(),
                local_tensor.dtype,
                local_tensor.device.type,
                shape,
                stride,
            )
            spec = _from_local_specs.get(key, _MISSING)
        except TypeError:  # an unhashable shape or stride (a list): torch's own function
            spec = None
        if spec is _MISSING:
            prepare_compile()
            spec = _from_local_spec(local_tensor, device_mesh, key[1], shape, stride)
            _remember(_from_local_specs, key, spec)
        if spec is None:
            return _stock_from_local(
                local_tensor, device_mesh, placements, run_check, shape, stride, grad_placements
            )
        if local_tensor.requires_grad:
            # NOTE: also without grad mode: the Function then only runs its forward, and its
            # output's requires_grad is what stock gives (False, on a view that requires grad).
            if grad_placements is not None:
                grad_placements = tuple(grad_placements)
            out_type = role(torch.is_grad_enabled())
            return _apply_from_torch(local_tensor, spec, grad_placements, out_type)  # type: ignore[no-any-return]
        return _new(FastDTensor, local_tensor.view_as(local_tensor), spec, requires_grad=False)

    # ARCHITECTURE "torch.compile": Dynamo fakes a FastDTensor input, and AOTAutograd
    # rebuilds every subclass output at run time, through __tensor_unflatten__: DTensor's builds a
    # plain DTensor, so the traced program would get a DTensor where it expects a FastDTensor (an
    # AssertionError) and compiled outputs would leave dtdispatch. Inside the trace the
    # ops on FastDTensors go through dtdispatch's __torch_dispatch__ on fake/functional local
    # tensors, which records the same local ops stock DTensor would. NOTE: a classmethod, so the
    # rebuilt tensor keeps the exact type (role) it was flattened from: AOTAutograd checks it.
    @classmethod
    def __tensor_unflatten__(
        cls,
        inner_tensors: dict[str, Any],
        flatten_spec: Any,
        outer_size: Any,
        outer_stride: Any,
    ) -> _FastDTensorBase:
        stock = DTensor.__tensor_unflatten__(  # type: ignore[no-untyped-call]  # torch: untyped
            inner_tensors, flatten_spec, outer_size, outer_stride
        )
        return _new(cls, stock._local_tensor, stock._spec, requires_grad=stock.requires_grad)

    def __coerce_same_metadata_as_tangent__(
        self, flatten_spec: Any, expected_type: type | None = None
    ) -> DTensor | None:
        """The gradient AOTAutograd's compiled backward expects, from the one that came: mixed
        programs make a FastDTensor gradient where the trace saw a DTensor one, or the reverse
        (torch's DTensor version gives up on any type change). Zero-copy unless the placements
        differ; then redistributed as torch's does."""
        target = FastDTensor if expected_type is None else expected_type
        if target not in FAST_TYPES and target is not DTensor:
            return None
        placements = tuple(flatten_spec[0])
        same: DTensor = self
        if tuple(self.placements) != placements:
            same = DTensor.redistribute(self, device_mesh=self.device_mesh, placements=placements)
        return _new(target, same._local_tensor, same._spec, requires_grad=same.requires_grad)

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        # NOTE: pickles as a stock DTensor plus a rebuild hook, so torch.load never needs to trust a
        # new global beyond dtdispatch's own function (see _rebuild). The stock
        # DTensor carries this tensor's instance dict (``_is_param`` of a Parameter, user
        # attributes) as stock's pickle does, and _rebuild puts it back.
        warn_if_has_hooks(self)  # as stock: hooks are not pickled
        stock = as_stock(cast(DTensor, self.detach()))
        state = self.__dict__
        if state:
            stock.__dict__.update(state)
        return (_rebuild, (stock, self.requires_grad))


class _RoleMeta(torch._C._TensorMeta):
    """``isinstance(x, FastDTensor)`` and ``issubclass(t, FastDTensor)`` hold for both roles (as
    ``nn.Parameter``'s metaclass does for its own instance check)."""

    def __instancecheck__(cls, obj: object) -> bool:
        if cls is FastDTensor:
            return isinstance(obj, _FastDTensorBase)
        return type.__instancecheck__(cls, obj)

    def __subclasscheck__(cls, sub: type) -> bool:
        if cls is FastDTensor:
            return issubclass(sub, _FastDTensorBase)
        return type.__subclasscheck__(cls, sub)


class FastDTensor(_FastDTensorBase, metaclass=_RoleMeta):
    """A ``DTensor`` whose aten ops go through dtdispatch.

    It *is* a DTensor (``isinstance``, ``placements``, ``to_local`` ...). Because it overrides
    ``__torch_dispatch__``, torch's C++ routes every op with at least one FastDTensor argument here
    instead of to its own fast path; outputs are FastDTensors, so a program stays on dtdispatch.
    The exact type ``FastDTensor`` is the replay role; ``isinstance`` covers both roles.
    """

    __slots__ = ()


# NOTE: the two roles are siblings, never one the other's subclass: Python runs a comparison's
# reflected method first when the right operand's type is a strict subclass of the left's (no
# override check, unlike arithmetic), so with AutogradFastDTensor a FastDTensor subclass,
# ``a > b`` ran as ``b < a`` and its output took b's layout. The type checker is told the old
# relation (isinstance holds at run time through _RoleMeta).
if TYPE_CHECKING:
    _AutogradBase = FastDTensor
else:
    _AutogradBase = _FastDTensorBase


class AutogradFastDTensor(_AutogradBase):
    """A FastDTensor in its autograd role (ARCHITECTURE "Two roles: replay and autograd"): the
    same tensor with no ``__torch_function__`` handler, as stock DTensor has none.

    Parameters that require grad, and outputs made under grad mode from such tensors, take this
    role: no call on them can be replayed above dispatch (autograd must see it), so torch calls no
    handler for their attribute reads and ops, which cost what they cost on stock; their aten ops
    still go through dtdispatch's ``__torch_dispatch__``. The role decides speed only, never a
    result: a call with a tensor in the replay role still enters the path above dispatch, whose key
    holds every argument's type.
    """

    __slots__ = ()

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]


FAST_TYPES = (FastDTensor, AutogradFastDTensor)
"""The exact types of dtdispatch tensors, one per role."""


_AUTOGRAD_ROLE: type[FastDTensor] = (
    AutogradFastDTensor if _compat.SUBCLASS_DISPATCH else FastDTensor
)
"""The type of the autograd role. NOTE: on a torch that never calls a subclass's
``__torch_dispatch__`` (2.11), the handler is the only way into dtdispatch, so there every
FastDTensor keeps it: a tensor without it would leave dtdispatch at its first op."""


def role(requires_grad: bool) -> type[FastDTensor]:
    """The type for a FastDTensor that does (autograd role) or does not (replay role) require
    grad when made."""
    return _AUTOGRAD_ROLE if requires_grad else FastDTensor


# ---------------------------------------------------------------------------------------------
# Cheap DTensor API calls: cached specs and redistribution plans, and one small autograd
# Function per call whose backward does what stock's does and hands on FastDTensor gradients.
#
# NOTE: every cache below maps immutable, shared objects (DTensorSpec is treated as immutable
# throughout dtdispatch) and is read and written under the GIL, one dict operation at a time, so
# the caches are process-wide. Each holds at most _CACHE_LIMIT entries and is emptied when full: a
# program has a handful of layouts, and a program whose layouts change every step must not grow
# memory.

_CACHE_LIMIT = 4096
_MISSING: Any = object()

_SAME, _CHUNK, _PARTITION, _TORCH = range(4)
_GATHER, _REDUCE_SCATTER, _ALL_REDUCE, _NORM_ALL_REDUCE = range(4, 8)  # the direct collectives
"""_RedistributePlan kinds: the local shard is unchanged; a local chunk (Replicate -> Shard on a
1-D mesh); the target placement's own partition (Replicate -> Partial or a norm's partial on a 1-D
mesh); torch's ``redistribute_local_tensor``; and on a 1-D CPU mesh, one direct collective
(``_collectives``): Shard -> Replicate of an even split, Partial("sum") -> Shard, Partial("sum")
-> Replicate, and a norm's partial -> Replicate between its own transforms."""


class _RedistributePlan:
    """How a local shard moves from one spec to ``target`` (immutable, shared). ``dim``: the shard
    dimension; ``chunks``: the mesh size; ``index``: this rank's coordinate."""

    __slots__ = ("chunks", "dim", "index", "kind", "target")

    def __init__(
        self, kind: int, target: DTensorSpec, *, dim: int = 0, chunks: int = 1, index: int = 0
    ) -> None:
        self.kind = kind
        self.target = target
        self.dim = dim
        self.chunks = chunks
        self.index = index


_forward_plans: dict[tuple[DTensorSpec, tuple[Placement, ...]], _RedistributePlan | None] = {}
"""(input spec, requested placements) -> plan of ``FastDTensor.redistribute`` (None: torch's own
method)."""
_from_local_grad_plans: dict[tuple[DTensorSpec, tuple[Placement, ...]], _RedistributePlan] = {}
"""(gradient spec, gradient placements) -> plan, for the backward of ``from_local`` (placements
taken as given, not normalized as ``redistribute`` normalizes them: stock's backward does not)."""
_backward_plans: dict[tuple[DTensorSpec, DTensorSpec], tuple[_RedistributePlan, DTensorSpec]] = {}
"""(gradient spec, the forward input's spec) -> (plan, the gradient's spec), for the backward of
``redistribute``."""
_from_local_specs: dict[tuple[Any, ...], DTensorSpec | None] = {}
"""``from_local`` arguments -> the spec stock builds (None: not cacheable, take torch's path)."""
_to_local_grad_specs: dict[tuple[Any, ...], DTensorSpec | None] = {}
"""(spec, grad_placements, gradient layout) -> the gradient spec of ``to_local``'s backward."""
_argument_plans: dict[tuple[DTensorSpec, DTensorSpec], _RedistributePlan] = {}
"""(argument spec, target spec) -> plan, for the dispatch path's redistributions of op arguments
(``redistribute_argument``)."""


def _grad_tensor(local: torch.Tensor, spec: DTensorSpec, requires_grad: bool) -> DTensor:
    """The DTensor gradient that the backward of ``redistribute`` and ``to_local`` hands on: a
    FastDTensor, so the backward ops on it alone stay on dtdispatch (stock's is a plain DTensor).
    Made in a backward pass: the autograd role, as the dispatch path's gradients."""
    return _new(_AUTOGRAD_ROLE, local, spec, requires_grad=requires_grad)


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def clear_call_caches() -> None:
    """Empty the caches of the DTensor API calls (for tests and memory measurements)."""
    for cache in (
        _forward_plans,
        _from_local_grad_plans,
        _backward_plans,
        _from_local_specs,
        _to_local_grad_specs,
        _argument_plans,
    ):
        cache.clear()


_REPLICATED: dict[int, tuple[Placement, ...]] = {}


def _replicated(ndim: int) -> tuple[Placement, ...]:
    placements = _REPLICATED.get(ndim)
    if placements is None:
        placements = _REPLICATED[ndim] = (Replicate(),) * ndim
    return placements


def _fresh_view(local: torch.Tensor) -> torch.Tensor:
    """``local.view_as(local)`` as stock's ``_ToTorchTensor.forward`` makes it: with grad mode off,
    so a local that requires grad (from_local of a leaf under no_grad) hands out no graph."""
    if local.requires_grad and torch.is_grad_enabled():
        with torch.no_grad():
            return local.view_as(local)
    return local.view_as(local)


def _stock_call(method: Any, self: DTensor, *args: Any, **kwargs: Any) -> FastDTensor:
    """Torch's own method, its result and the gradients it hands on made FastDTensors."""
    if _compiling():
        # NOTE: Dynamo traces neither a grad_fn hook nor _dtensor__new__: compiled_fast is their
        # in-graph equivalent (allow_in_graph, see prepare_compile).
        return compiled_fast(method(compiled_fast(self), *args, **kwargs))
    return as_fast(_fast_grads(method(self, *args, **kwargs)))  # type: ignore[arg-type]


def _stock_from_local(
    local_tensor: torch.Tensor,
    device_mesh: DeviceMesh | None,
    placements: Sequence[Placement] | None,
    run_check: bool,
    shape: torch.Size | None,
    stride: tuple[int, ...] | None,
    grad_placements: Sequence[Placement] | None,
) -> FastDTensor:
    stock = DTensor.from_local(
        local_tensor,
        device_mesh,
        placements,
        run_check=run_check,
        shape=shape,
        stride=stride,
        grad_placements=grad_placements,
    )
    if _compiling():
        return compiled_fast(stock)
    prepare_compile()
    return as_fast(stock)


def _plan_between(current: DTensorSpec, target: DTensorSpec) -> _RedistributePlan:
    """The plan that moves a local shard laid out by ``current`` to ``target``: what torch's
    ``redistribute_local_tensor`` would do, as a kind decided once (anything unusual: torch's
    function itself, with its errors)."""
    mesh = current.mesh
    if target.mesh != mesh or len(target.placements) != len(current.placements):
        return _RedistributePlan(_TORCH, target)
    if not mesh._is_current_rank_part_of_mesh():
        return _RedistributePlan(_SAME, target)  # torch returns the (empty) local tensor unchanged
    if current.placements == target.placements and current.shard_order == target.shard_order:
        return _RedistributePlan(_SAME, target)
    if mesh.ndim == 1:
        if mesh.size() == 1:
            # NOTE: torch skips every transform of a mesh dimension of size 1 (no collective).
            return _RedistributePlan(_SAME, target)
        (src,), (dst,) = current.placements, target.placements
        if type(src) is Replicate and type(dst) is Shard:
            coordinate = mesh.get_coordinate()
            assert coordinate is not None  # participating rank, checked above
            return _RedistributePlan(
                _CHUNK, target, dim=dst.dim, chunks=mesh.size(), index=coordinate[0]
            )
        # NOTE: exact types: these partitions are pure functions of the value and the mesh size; a
        # _MaskPartial's materializes a mask buffer that its reduction later reads.
        if type(src) is Replicate and type(dst) in (Partial, _NormPartial):
            return _RedistributePlan(_PARTITION, target)
        if mesh.device_type == "cpu":
            direct = _direct_kind(src, dst, current)
            if direct is not None:
                kind, dim = direct
                return _RedistributePlan(kind, target, dim=dim, chunks=mesh.size())
    return _RedistributePlan(_TORCH, target)


def _direct_kind(
    src: Placement, dst: Placement, current: DTensorSpec
) -> tuple[int, int] | None:
    """The direct collective for ``src -> dst`` on a 1-D mesh and its shard dimension, or None
    (torch's function).

    NOTE: exact types only: a Partial subclass transforms values around its reduction (a norm's
    transforms are its own methods, called around the all-reduce; a mask's reads state) and a
    _StridedShard reorders shards. Only CPU meshes: the direct calls were checked bitwise against
    torch's on gloo, not on NCCL streams."""
    if type(src) is Shard and type(dst) is Replicate:
        meta = current.tensor_meta
        # torch pads an uneven split around the gather: left to torch.
        if meta is not None and meta.shape[src.dim] % current.mesh.size() == 0:
            return _GATHER, src.dim
        return None
    if type(src) is Partial and src.reduce_op == "sum":
        if type(dst) is Replicate:
            return _ALL_REDUCE, 0
        if type(dst) is Shard:
            return _REDUCE_SCATTER, dst.dim
    if (
        type(src) is _NormPartial
        and src.reduce_op == "sum"
        and type(dst) is Replicate
        and _compat.NORM_REDUCE_BY_TRANSFORMS
    ):
        return _NORM_ALL_REDUCE, 0
    return None


def _redistribute_plan(
    spec: DTensorSpec, placements: tuple[Placement, ...], *, ndim: int
) -> _RedistributePlan | None:
    """The plan of ``redistribute(placements=placements)``, checked and normalized as stock does
    (``DTensor.redistribute``, ``Redistribute.forward``); None (torch's own method, its errors) for
    placements that do not match the mesh or that make a new Partial."""
    if len(placements) != spec.mesh.ndim:
        return None
    normalized = list(placements)
    for i, placement in enumerate(normalized):
        if placement.is_partial() and spec.placements[i] != placement:
            # NOTE: torch 2.13 refuses this, 2.14 allows it: torch's own method decides.
            return None
        elif isinstance(placement, Shard) and placement.dim < 0:
            normalized[i] = Shard(placement.dim + ndim)
        elif isinstance(placement, _StridedShard) and placement.dim < 0:
            normalized[i] = _StridedShard(placement.dim + ndim, split_factor=placement.split_factor)
    target_placements = tuple(normalized)
    if spec.placements == target_placements:
        # stock: the same local tensor and the same spec object
        return _RedistributePlan(_SAME, spec)
    target = DTensorSpec(spec.mesh, target_placements, tensor_meta=spec.tensor_meta)
    assert_no_mixed_partial_types(spec.placements)
    assert_no_mixed_partial_types(target_placements)
    return _plan_between(spec, target)


def _run(
    plan: _RedistributePlan,
    local: torch.Tensor,
    current: DTensorSpec,
    *,
    async_op: bool,
    explicit: bool,
) -> torch.Tensor:
    """``redistribute_local_tensor(local, current, plan.target)``, bitwise, by the plan."""
    kind = plan.kind
    if kind == _SAME:
        return local
    # NOTE: the two local-only plans below skip torch's function (the chunk is a narrow where torch
    # splits): only where no mode or trace sees how the local was made.
    if kind == _CHUNK and type(local) is torch.Tensor and _collectives.unobserved():
        # Mirrors Shard._replicate_to_shard: torch.chunk(local, chunks, dim)[index].clone(), and an
        # empty shard (new_zeros) for an index past the last chunk of an uneven split.
        dim = plan.dim
        size = local.size(dim)
        if size > 0:
            chunk = (size + plan.chunks - 1) // plan.chunks
            start = chunk * plan.index
            if start < size:
                return local.narrow(dim, start, min(chunk, size - start)).clone()
            shape = list(local.shape)
            shape[dim] = 0
            return local.new_zeros(shape)
    if kind == _PARTITION and type(local) is torch.Tensor and _collectives.unobserved():
        # Mirrors redistribute_local_tensor's Replicate -> Partial: the target placement's own
        # _partition_value on the mesh dimension.
        partial = cast(Partial, plan.target.placements[0])
        return partial._partition_value(local, current.mesh, 0)
    if kind >= _GATHER and _collectives.usable(local):
        # NOTE: the group of this call's own mesh, never one cached with the plan: meshes over the
        # same ranks built from different process groups compare equal (so do their specs).
        group = current.mesh.get_group(0)
        if kind == _NORM_ALL_REDUCE:
            # NOTE: synchronous only: torch's inverse transform waits on its asynchronous result.
            direct = None if async_op else _norm_all_reduce(local, current, group)
        elif kind == _ALL_REDUCE:
            direct = _collectives.all_reduce_sum(local, group, async_op)
        elif kind == _GATHER:
            direct = _collectives.all_gather(local, group, plan.chunks, plan.dim, async_op)
        else:
            direct = _collectives.reduce_scatter_sum(local, group, plan.chunks, plan.dim, async_op)
        if direct is not None:
            return direct
    return redistribute_local_tensor(
        local, current, plan.target, async_op=async_op, is_explicit=explicit
    )


def _norm_all_reduce(local: torch.Tensor, current: DTensorSpec, group: Any) -> torch.Tensor:
    """Mirrors ``_NormPartial._reduce_value``: its transform, Partial's all-reduce (direct), its
    inverse transform."""
    norm = cast(_NormPartial, current.placements[0])
    reduced = _collectives.all_reduce_sum(norm._pre_reduce_transform(local), group, False)
    assert reduced is not None  # synchronous: never left to torch
    return norm._post_reduce_transform(reduced)


def redistribute_argument(
    local: torch.Tensor, current: DTensorSpec, target: DTensorSpec
) -> torch.Tensor:
    """The dispatch path's redistribution of an op argument: torch's
    ``redistribute_local_tensor(local, current, target)`` (implicit, synchronous), by a plan cached
    per (current, target), so that the collectives of a 1-D CPU mesh are direct ones."""
    key = (current, target)
    plan = _argument_plans.get(key)
    if plan is None:
        plan = _plan_between(current, target)
        _remember(_argument_plans, key, plan)
    return _run(plan, local, current, async_op=False, explicit=False)


class Redistribute(torch.autograd.Function):
    """``redistribute`` with a plan (named as torch's, so ``grad_fn`` reads the same). Backward:
    stock's ``_redistribute_backward`` (gradient placements normalized the same way), as a
    FastDTensor; with ``create_graph`` torch's twice-differentiable ``NestedRedistribute``."""

    @staticmethod
    def forward(ctx: Any, input: DTensor, plan: _RedistributePlan, async_op: bool) -> FastDTensor:
        spec = input._spec
        ctx.spec = spec
        ctx.async_op = async_op
        ctx.dtype = input._local_tensor.dtype
        local = _run(plan, input._local_tensor, spec, async_op=async_op, explicit=True)
        # NOTE: apply() runs this under grad mode only for an input that requires grad, so the
        # output will: the autograd role.
        return _new(_AUTOGRAD_ROLE, local, plan.target, requires_grad=True)

    @staticmethod
    def backward(ctx: Any, grad: DTensor) -> tuple[Any, None, None]:
        return _redistribute_grad(grad, ctx.spec, ctx.async_op, ctx.dtype), None, None


def _redistribute_grad(
    grad: DTensor, previous: DTensorSpec, async_op: bool, dtype: torch.dtype
) -> DTensor:
    if torch.is_grad_enabled() or grad._local_tensor.dtype != dtype:
        # create_graph, or a gradient of another dtype (stock casts it): torch's own backward.
        if _compat.nested_redistribute is None:  # torch < 2.13: its own backward via the method
            return as_fast(DTensor.redistribute(grad, previous.mesh, previous.placements))
        out = _compat.nested_redistribute.apply(grad, previous, async_op, dtype, dtype)
        return as_fast(out)
    spec = grad._spec
    key = (spec, previous)
    entry = _backward_plans.get(key)
    if entry is None:
        # Mirrors _redistribute_backward: a Shard or Replicate gradient of a Partial input stays
        # Replicate (no conversion back to Partial); the transform targets the input's spec, the
        # result carries the gradient's global shape and stride.
        normalized = tuple(
            Replicate()
            if (_compat.is_shard_like(current) or current.is_replicate()) and target.is_partial()
            else target
            for current, target in zip(spec.placements, previous.placements, strict=True)
        )
        strided = previous.use_strided_shard_as_shard_order
        transform = DTensorSpec(
            previous.device_mesh,
            placements=normalized,
            tensor_meta=previous.tensor_meta,
            use_strided_shard_as_shard_order=strided,
        )
        meta = spec.tensor_meta
        assert meta is not None  # every DTensor's spec has its tensor meta
        out = DTensorSpec(
            previous.device_mesh,
            normalized,
            tensor_meta=TensorMeta(shape=meta.shape, stride=meta.stride, dtype=dtype),
            use_strided_shard_as_shard_order=strided,
        )
        entry = (_plan_between(spec, transform), out)
        _remember(_backward_plans, key, entry)
    plan, out_spec = entry
    local = _run(plan, grad._local_tensor, spec, async_op=async_op, explicit=False)
    return _grad_tensor(local, out_spec, grad.requires_grad)


class _ToTorchTensor(torch.autograd.Function):
    """``to_local`` / ``full_tensor`` (named as torch's). Backward: the gradient as a FastDTensor
    with the spec stock's backward builds (cached per layout)."""

    @staticmethod
    def forward(
        ctx: Any, input: DTensor, grad_placements: tuple[Placement, ...] | None
    ) -> torch.Tensor:
        ctx.spec = input._spec
        ctx.grad_placements = grad_placements
        ctx.set_materialize_grads(False)
        local = input._local_tensor
        ctx.local_stride = local.stride()
        # A fresh tensor object: autograd metadata is written into it, not into the local shard.
        return local.view_as(local)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[Any, None]:
        if grad is None:
            return None, None
        spec, grad_placements, local_stride = ctx.spec, ctx.grad_placements, ctx.local_stride
        # NOTE: torch >= 2.14 keeps the forward's spec when the gradient's stride matches the
        # forward local's: the local stride decides the gradient's spec, so it is in the key.
        key = (
            spec,
            grad_placements,
            local_stride,
            grad.shape,
            grad.stride(),
            grad.dtype,
            grad.device.type,
        )
        grad_spec = _to_local_grad_specs.get(key, _MISSING)
        if grad_spec is _MISSING:
            grad_spec = _to_local_grad_spec(spec, grad_placements, local_stride, grad)
            _remember(_to_local_grad_specs, key, grad_spec)
        if grad_spec is None:  # another device: stock's backward (it moves the gradient)
            stock = _stock_to_local_backward(spec, grad_placements, local_stride, grad)
            return as_fast(stock), None
        if torch.is_grad_enabled() and grad.requires_grad:  # create_graph: differentiable
            return _apply_from_torch(grad, grad_spec, None, _AUTOGRAD_ROLE), None
        return _grad_tensor(grad.view_as(grad), grad_spec, False), None


def _to_local_grad_spec(
    spec: DTensorSpec,
    grad_placements: tuple[Placement, ...] | None,
    local_stride: tuple[int, ...],
    grad: torch.Tensor,
) -> DTensorSpec | None:
    """The spec of the gradient stock's ``_ToTorchTensor.backward`` builds, computed by running it
    once (without grad); None when it would move the gradient to another device."""
    if grad.device.type != spec.mesh.device_type:
        return None
    with torch.no_grad():
        stock = _stock_to_local_backward(spec, grad_placements, local_stride, grad.detach())
    return stock._spec


class _StockToLocalContext:
    """The attributes stock's ``_ToTorchTensor.backward`` reads from its context (the local stride
    from torch 2.14)."""

    __slots__ = ("dtensor_spec", "grad_placements", "local_tensor_stride")

    def __init__(
        self,
        spec: DTensorSpec,
        grad_placements: tuple[Placement, ...] | None,
        local_stride: tuple[int, ...],
    ) -> None:
        self.dtensor_spec = spec
        self.grad_placements = grad_placements
        self.local_tensor_stride = local_stride


def _stock_to_local_backward(
    spec: DTensorSpec,
    grad_placements: tuple[Placement, ...] | None,
    local_stride: tuple[int, ...],
    grad: torch.Tensor,
) -> DTensor:
    """Stock's backward of ``to_local`` (a plain DTensor gradient)."""
    ctx = _StockToLocalContext(spec, grad_placements, local_stride)
    return cast(DTensor, _TorchToTorchTensor.backward(ctx, grad)[0])


class _FromTorchTensor(torch.autograd.Function):
    """``from_local`` with a cached spec (named as torch's). Backward: stock's (the gradient
    redistributed to ``grad_placements`` or the forward placements with Partial -> Replicate, then
    its local tensor)."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        spec: DTensorSpec,
        grad_placements: tuple[Placement, ...] | None,
        out_type: type[FastDTensor],
    ) -> FastDTensor:
        # NOTE: out_type comes from the caller: grad mode is off inside forward, and the output
        # requires grad exactly when the call was made under grad mode (its role).
        ctx.spec = spec
        ctx.grad_placements = grad_placements
        ctx.set_materialize_grads(False)
        return _new(out_type, input.view_as(input), spec, requires_grad=input.requires_grad)

    @staticmethod
    def backward(ctx: Any, grad: DTensor | None) -> tuple[Any, None, None, None]:
        if grad is None:
            return None, None, None, None
        placements = ctx.grad_placements
        if placements is None:
            placements = _normalize_placements_for_grad(ctx.spec.placements)
        if grad.placements != placements:
            key = (grad._spec, placements)
            plan = _from_local_grad_plans.get(key)
            if plan is None:
                target = DTensorSpec(ctx.spec.mesh, placements, tensor_meta=grad._spec.tensor_meta)
                plan = _plan_between(grad._spec, target)
                _remember(_from_local_grad_plans, key, plan)
            local = _run(plan, grad._local_tensor, grad._spec, async_op=False, explicit=False)
            return local, None, None, None
        return grad.to_local(), None, None, None


def _applier(function: type[torch.autograd.Function]) -> Callable[..., Any]:
    """``function.apply`` without its Python wrapper (which only unwraps functorch's dead wrappers
    and binds defaults for ``setup_context``, neither used here) unless a functorch transform is
    active: about 3 µs of the 10 µs an autograd Function costs."""
    c_apply = super(torch.autograd.Function, function).apply  # type: ignore[misc]

    def apply(*args: Any) -> Any:
        if _functorch_active():
            return function.apply(*args)  # type: ignore[no-untyped-call]
        return c_apply(*args)

    return apply


_functorch_active = torch._C._are_functorch_transforms_active


def _from_local_spec(
    local: torch.Tensor,
    mesh: DeviceMesh,
    placements: tuple[Placement, ...] | None,
    shape: torch.Size | None,
    stride: tuple[int, ...] | None,
) -> DTensorSpec | None:
    """The spec stock's ``from_local`` builds for these arguments, computed by running it once
    (without grad; its errors are torch's); None where it would move the tensor to the mesh's
    device or replace it (a rank outside the mesh)."""
    if local.device.type != mesh.device_type or not mesh._is_current_rank_part_of_mesh():
        return None
    with torch.no_grad():
        stock = DTensor.from_local(
            local.detach(), mesh, placements, run_check=False, shape=shape, stride=stride
        )
    return stock._spec


def _grads_to_fast(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(as_fast(g) if isinstance(g, DTensor) else g for g in grad_inputs)


def _fast_grads(result: torch.Tensor) -> torch.Tensor:
    """``result``, unchanged; the node that made it hands on DTensor gradients as FastDTensors."""
    node = result.grad_fn
    if node is not None:
        node.register_hook(_grads_to_fast)
    return result


# NOTE: pickled by name: every saved FastDTensor refers to ``dtdispatch._tensor._rebuild``, so
# renaming or moving this function breaks loading existing checkpoints.
def _rebuild(stock: DTensor, requires_grad: bool) -> FastDTensor:
    """Unpickle a FastDTensor: the stock DTensor it was pickled as, its instance dict kept (a
    Parameter stays one)."""
    prepare_compile()  # unpickling is a way in besides accelerate
    out = _new(role(requires_grad), stock._local_tensor, stock._spec, requires_grad=requires_grad)
    state = stock.__dict__
    if state:
        out.__dict__.update(state)
    return out


_apply_redistribute = _applier(Redistribute)
_apply_to_torch = _applier(_ToTorchTensor)
_apply_from_torch = _applier(_FromTorchTensor)


# NOTE: torch.load defaults to weights_only=True, which loads stock DTensor checkpoints but refuses
# any global it does not know. _rebuild only wraps an already-unpickled DTensor and a
# bool, so allowing it is safe, and a dtdispatch checkpoint loads with the same default call as a
# stock one.
torch.serialization.add_safe_globals([_rebuild])


def _fast_from(t: DTensor) -> FastDTensor:
    requires_grad = t.requires_grad
    return _new(role(requires_grad), t._local_tensor, t._spec, requires_grad=requires_grad)


class _ToFast(torch.autograd.Function):
    """Zero-copy DTensor -> FastDTensor that keeps the autograd graph (gradients pass through
    unchanged)."""

    @staticmethod
    def forward(ctx: Any, t: DTensor) -> FastDTensor:
        # Applied only to a non-leaf that requires grad: the output will too.
        return _new(_AUTOGRAD_ROLE, t._local_tensor, t._spec, requires_grad=False)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        return grad


class _ToFastGradsFast(torch.autograd.Function):
    """``_ToFast`` that also hands its input's gradient on as a FastDTensor: inside a compiled
    graph, the counterpart of ``_fast_grads`` (whose grad_fn hook Dynamo cannot trace)."""

    @staticmethod
    def forward(ctx: Any, t: DTensor) -> FastDTensor:
        local = t._local_tensor
        # In AOTAutograd's joint trace the local tensor itself requires grad (torch warns when a
        # DTensor wraps such a tensor); the Function, not the local, carries the graph here.
        if local.requires_grad:
            local = local.detach()
        return _new(FastDTensor, local, t._spec, requires_grad=False)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        return _fast_from(grad) if isinstance(grad, DTensor) else grad


def compiled_fast(t: DTensor) -> FastDTensor:
    """Under torch.compile: the FastDTensor view of ``t``, gradients handed on as FastDTensors.

    NOTE: registered with ``torch._dynamo.allow_in_graph`` by ``prepare_compile`` so Dynamo writes
    the call into the graph instead of tracing ``_dtensor__new__`` (which it cannot: a graph
    break, and an error under fullgraph=True); AOTAutograd then traces it like any subclass code.
    """
    return _ToFastGradsFast.apply(t)  # type: ignore[no-untyped-call,no-any-return]  # torch: Function.apply is untyped


_compile_prepared: list[bool] = []


def prepare_compile() -> None:
    """Register ``compiled_fast`` with Dynamo, once. Called where FastDTensors first appear
    (``accelerate``, ``FastDTensor.from_local``, unpickling) rather than at import, which would
    import torch._dynamo (about a second of start-up) into every process.

    NOTE: without it, a compiled region that converts to FastDTensor graph-breaks (an error under
    fullgraph=True): Dynamo cannot trace ``_dtensor__new__``."""
    if not _compile_prepared:
        import torch._dynamo

        torch._dynamo.allow_in_graph(compiled_fast)  # type: ignore[no-untyped-call]  # torch: untyped
        _compile_prepared.append(True)


class _ToStock(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: DTensor) -> DTensor:
        return _new(DTensor, t._local_tensor, t._spec, requires_grad=False)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        return grad


def as_fast(t: DTensor) -> FastDTensor:
    """The FastDTensor view of ``t`` (same local shard, same spec). Differentiable when ``t``
    needs grad."""
    if type(t) in FAST_TYPES:
        return cast(FastDTensor, t)
    if not isinstance(t, DTensor):
        raise TypeError(
            f"dtdispatch.accelerate expects a DTensor or an nn.Module, got {type(t).__name__}"
        )
    if t.requires_grad and not t.is_leaf:
        return _ToFast.apply(t)  # type: ignore[no-untyped-call,no-any-return]  # torch: Function.apply is untyped
    return _fast_from(t)


def as_stock(t: DTensor) -> DTensor:
    """The plain DTensor view of ``t``: the way back from dtdispatch."""
    if type(t) is DTensor:
        return t
    if not isinstance(t, DTensor):
        raise TypeError(
            f"dtdispatch.to_torch expects a DTensor or an nn.Module, got {type(t).__name__}"
        )
    if t.requires_grad and not t.is_leaf:
        return _ToStock.apply(t)  # type: ignore[no-untyped-call,no-any-return]  # torch: Function.apply is untyped
    return _new(DTensor, t._local_tensor, t._spec, requires_grad=t.requires_grad)


def wrap_spec(local: torch.Tensor, spec: DTensorSpec) -> FastDTensor:
    """The output constructor (torch's ``OpDispatcher.wrap`` for one tensor)."""
    requires_grad = local.requires_grad
    return _new(role(requires_grad), local, spec, requires_grad=requires_grad)
