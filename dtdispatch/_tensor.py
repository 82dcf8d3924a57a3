"""The dtdispatch tensor: a DTensor whose ops dispatch through dtdispatch (DESIGN §4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, SupportsIndex, cast

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec

__all__ = ["FastDTensor", "as_fast", "as_stock"]

_new = torch.Tensor._dtensor__new__
_compiling = torch.compiler.is_compiling


class FastDTensor(DTensor):
    """A ``DTensor`` whose aten ops go through dtdispatch.

    It *is* a DTensor (``isinstance``, ``placements``, ``to_local`` ...). Because it overrides
    ``__torch_dispatch__``, torch's C++ routes every op with at least one FastDTensor argument here
    instead of to its own fast path; outputs are FastDTensors, so a program stays on dtdispatch.
    """

    __slots__ = ()

    # NOTE: __torch_dispatch__ is installed by dtdispatch.dispatcher (the native entry point, C or
    # its Python twin), so that the hot path does not pay for an extra Python frame here.

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"FastDTensor(local_tensor={self._local_tensor}, device_mesh={self._spec.mesh}, "
            f"placements={self._spec.placements})"
        )

    def redistribute(self, *args: Any, **kwargs: Any) -> FastDTensor:
        if _compiling():
            return compiled_fast(DTensor.redistribute(compiled_fast(self), *args, **kwargs))
        return _ToFast.apply(_fast_grads(DTensor.redistribute(self, *args, **kwargs)))  # type: ignore[no-untyped-call,no-any-return]  # torch: Function.apply is untyped

    # NOTE: torch's backward of to_local / full_tensor / redistribute builds the input's gradient
    # as a plain DTensor (``_ToTorchTensor.backward`` calls ``DTensor.from_local``,
    # ``Redistribute.backward`` builds a ``DTensor``), so every backward op on that gradient alone
    # would leave dtdispatch (a training step fell to 77% on dtdispatch). These overrides run
    # torch's own method and hook its fresh, per-call graph node so that it hands the gradient on
    # as a FastDTensor: same values, same grad_fn names, no extra node. Under torch.compile (Dynamo
    # cannot trace a grad_fn hook) ``compiled_fast`` does the same inside the traced graph.
    def to_local(self, *, grad_placements: Sequence[Any] | None = None) -> torch.Tensor:
        if _compiling():
            return DTensor.to_local(compiled_fast(self), grad_placements=grad_placements)
        result = DTensor.to_local(self, grad_placements=grad_placements)
        # Without grad mode torch returns the local shard itself: no graph node to hook.
        return _fast_grads(result) if torch.is_grad_enabled() else result

    def full_tensor(self, *, grad_placements: Sequence[Any] | None = None) -> torch.Tensor:
        if _compiling():
            return DTensor.full_tensor(compiled_fast(self), grad_placements=grad_placements)
        return _fast_grads(DTensor.full_tensor(self, grad_placements=grad_placements))

    @staticmethod
    def from_local(
        local_tensor: torch.Tensor,
        device_mesh: Any = None,
        placements: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> FastDTensor:
        """``DTensor.from_local`` that returns a FastDTensor (autograd-correct)."""
        stock = DTensor.from_local(local_tensor, device_mesh, placements, **kwargs)
        if _compiling():
            return compiled_fast(stock)
        prepare_compile()  # a way in besides accelerate: later compiled calls need the registration
        return _ToFast.apply(stock)  # type: ignore[no-untyped-call,no-any-return]  # torch: Function.apply is untyped

    # torch.compile (DESIGN §12, "under tracing"). Dynamo fakes a FastDTensor input, and AOTAutograd
    # rebuilds every subclass output at run time, through __tensor_unflatten__: DTensor's builds a
    # plain DTensor, so the traced program expected a DTensor where a FastDTensor came (the
    # AssertionError of issue 10) and compiled outputs would leave dtdispatch. Inside the trace the
    # ops on FastDTensors go through dtdispatch's __torch_dispatch__ on fake/functional local
    # tensors, which records the same local ops stock DTensor would.
    @staticmethod
    def __tensor_unflatten__(
        inner_tensors: dict[str, Any], flatten_spec: Any, outer_size: Any, outer_stride: Any
    ) -> FastDTensor:
        stock = DTensor.__tensor_unflatten__(  # type: ignore[no-untyped-call]  # torch: untyped
            inner_tensors, flatten_spec, outer_size, outer_stride
        )
        return _fast_from(stock)

    def __coerce_same_metadata_as_tangent__(
        self, flatten_spec: Any, expected_type: type | None = None
    ) -> DTensor | None:
        """The gradient AOTAutograd's compiled backward expects, from the one that came: mixed
        programs make a FastDTensor gradient where the trace saw a DTensor one, or the reverse
        (torch's DTensor version gives up on any type change). Zero-copy unless the placements
        differ; then redistributed as torch's does."""
        target = FastDTensor if expected_type is None else expected_type
        if target is not FastDTensor and target is not DTensor:
            return None
        placements = tuple(flatten_spec[0])
        same: DTensor = self
        if tuple(self.placements) != placements:
            same = DTensor.redistribute(self, device_mesh=self.device_mesh, placements=placements)
        return _new(target, same._local_tensor, same._spec, requires_grad=same.requires_grad)

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        # NOTE: pickles as a stock DTensor plus a rebuild hook, so torch.load never needs to trust a
        # new global beyond dtdispatch's own function (see _rebuild).
        return (_rebuild, (as_stock(cast(DTensor, self.detach())), self.requires_grad))


def _grads_to_fast(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(as_fast(g) if isinstance(g, DTensor) else g for g in grad_inputs)


def _fast_grads(result: torch.Tensor) -> torch.Tensor:
    """``result``, unchanged; the node that made it hands on DTensor gradients as FastDTensors."""
    node = result.grad_fn
    if node is not None:
        node.register_hook(_grads_to_fast)
    return result


def _rebuild(stock: DTensor, requires_grad: bool) -> FastDTensor:
    prepare_compile()  # unpickling is a way in besides accelerate
    out = _new(FastDTensor, stock._local_tensor, stock._spec, requires_grad=requires_grad)
    return out


# NOTE: torch.load defaults to weights_only=True, which loads stock DTensor checkpoints but refuses
# any global it does not know. _rebuild only wraps an already-unpickled DTensor and a bool, so
# allowing it is safe, and a dtdispatch checkpoint loads with the same default call as a stock one.
torch.serialization.add_safe_globals([_rebuild])


def _fast_from(t: DTensor) -> FastDTensor:
    return _new(FastDTensor, t._local_tensor, t._spec, requires_grad=t.requires_grad)


class _ToFast(torch.autograd.Function):
    """Zero-copy DTensor -> FastDTensor that keeps the autograd graph (gradients pass through
    unchanged)."""

    @staticmethod
    def forward(ctx: Any, t: DTensor) -> FastDTensor:
        return _new(FastDTensor, t._local_tensor, t._spec, requires_grad=False)

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
    import torch._dynamo (1.5 s on the loaded development VM) into every process.

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
    if type(t) is FastDTensor:
        return t
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
    return _new(FastDTensor, local, spec, requires_grad=local.requires_grad)
