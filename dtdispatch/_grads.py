"""Reducing ``Partial`` gradients once, before clipping (ARCHITECTURE "Reducing Partial gradients
once").

An explicit option, never applied by ``accelerate``: it changes an observable of stock DTensor (the
placements of ``.grad``), and the parameters after clipping and the optimizer step by rounding.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import Placement

from dtdispatch._tensor import FAST_TYPES

__all__ = ["reduce_partial_grads"]

_new = torch.Tensor._dtensor__new__

_COALESCED_OPS: dict[str, dist.ReduceOp.RedOpType] = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.AVG,
    "product": dist.ReduceOp.PRODUCT,
    "min": dist.ReduceOp.MIN,
    "max": dist.ReduceOp.MAX,
}
"""``Partial.reduce_op`` -> the c10d op of the coalesced all-reduce: the ops gloo and nccl both
have. The bitwise ops (``"band"``, ``"bor"``, ``"bxor"``: nccl has none) take ``redistribute``,
so they work or raise exactly as stock does on each backend."""

_RETYPED = (DTensor, *FAST_TYPES)
"""Gradient types rebuilt around the reduced local tensor with their own type; a user's DTensor
subclass takes its own ``redistribute`` instead."""

# A bucket: (mesh, mesh dim, dtype, device, reduce op).
_BucketKey = tuple[DeviceMesh, int, torch.dtype, torch.device, str]


def reduce_partial_grads(parameters: torch.Tensor | Iterable[torch.Tensor]) -> int:
    """Reduce every ``Partial`` DTensor gradient of ``parameters`` to ``Replicate``, coalesced.

    Call it after backward and before clipping: stock DTensor reduces such a gradient twice (the
    gradient norm redistributes it to take its norm, the optimizer step reduces the scaled partial
    values again); after this call both see a Replicate gradient, so clipping and the optimizer
    issue no all-reduce for it. One all-reduce per bucket of gradients with the same (mesh, mesh
    dim, dtype, device, reduce op): the local gradients are flattened into one buffer, all-reduced
    and split back, and ``.grad`` becomes a DTensor of the same type (a FastDTensor stays one) on
    the same mesh, ``Replicate`` on the Partial mesh dim, its other placements and global shape and
    stride unchanged; its local tensor is a contiguous view of the bucket's buffer.

    What differs from stock, on purpose:

    - ``.grad`` placements: ``Replicate`` instead of ``Partial``.
    - The reduced values: bitwise equal to stock's ``grad.redistribute(...)`` on a mesh dim of
      2 ranks (a reduction of two values does not depend on its order). With more ranks the
      backend may sum a flattened buffer in another order than the single gradient: with gloo at
      4 ranks one gradient of the test's block differs from stock's by 1 ulp (max), within the
      bound of two summation orders (tests/distributed/test_reduce_partial_grads.py); nccl's
      algorithms give no guarantee either way.
    - After gradient clipping and the optimizer step, the parameters differ from stock by
      rounding: stock scales each rank's partial value and sums later (``a*c + b*c``), this
      scales the sum (``(a+b)*c``). The gradient norm is bitwise stock's wherever the reduced
      values are.

    Gradients that are not a DTensor, have no ``Partial`` placement, or are None are left alone.
    These take a per-gradient ``grad.redistribute`` instead of a bucket (stock's result and
    collectives): the bitwise reduce ops (nccl has none), a Partial subclass
    (``_NormPartial``, ``_MaskPartial``: their own reductions), Partial on more than one mesh dim
    (stock's order of reductions), a gradient of a user's DTensor subclass, and every gradient on
    a rank outside its mesh (no collective there, as on stock). Buckets run in the order their
    first gradient appears in ``parameters``, the per-gradient reductions after them: every rank
    must pass the same parameters in the same order, as for any collective.

    Args:
        parameters: a tensor or an iterable of tensors (``model.parameters()``); a parameter
            listed twice is reduced once.

    Returns:
        How many gradients were reduced (bucketed and per-gradient together).

    Raises:
        TypeError: an element of ``parameters`` is not a tensor.
        ValueError: a Partial gradient requires grad (a backward with ``create_graph=True``):
            reducing it here would cut its graph; call ``grad.redistribute`` on it instead.
    """
    params: list[torch.Tensor] = (
        [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    )
    buckets: dict[_BucketKey, list[tuple[torch.Tensor, DTensor, DTensorSpec]]] = {}
    single: list[tuple[torch.Tensor, DTensor, tuple[Placement, ...]]] = []
    seen: set[int] = set()
    for position, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"reduce_partial_grads expects tensors, got {type(p).__name__} at position "
                f"{position}; pass the parameters, e.g. model.parameters()"
            )
        if id(p) in seen:
            continue
        seen.add(id(p))
        grad = p.grad
        if not isinstance(grad, DTensor):
            continue
        placements = grad.placements
        partial_dims = [i for i, pl in enumerate(placements) if pl.is_partial()]
        if not partial_dims:
            continue
        if grad.requires_grad:
            raise ValueError(
                f"reduce_partial_grads: the gradient of the parameter at position {position} "
                "requires grad (a backward with create_graph=True); reducing it here would cut "
                "its graph: call grad.redistribute(...) on it instead"
            )
        target = tuple(Replicate() if pl.is_partial() else pl for pl in placements)
        mesh = grad.device_mesh
        placement = placements[partial_dims[0]]
        op = placement.reduce_op if type(placement) is Partial else None
        if (
            len(partial_dims) == 1
            and op in _COALESCED_OPS
            and type(grad) in _RETYPED
            and mesh.get_coordinate() is not None
        ):
            assert op is not None
            local = grad._local_tensor
            key = (mesh, partial_dims[0], local.dtype, local.device, op)
            spec = DTensorSpec(mesh, target, tensor_meta=grad._spec.tensor_meta)
            buckets.setdefault(key, []).append((p, grad, spec))
        else:
            single.append((p, grad, target))
    with torch.no_grad():
        for key, members in buckets.items():
            _reduce_bucket(key, members)
        for p, grad, target in single:
            p.grad = grad.redistribute(grad.device_mesh, target)
    return sum(len(members) for members in buckets.values()) + len(single)


def _reduce_bucket(
    key: _BucketKey, members: list[tuple[torch.Tensor, DTensor, DTensorSpec]]
) -> None:
    """One all-reduce of the flattened local gradients of ``members``; each ``.grad`` becomes its
    reduced slice under the member's Replicate spec."""
    mesh, mesh_dim, _, _, op = key
    locals_ = [grad._local_tensor for _, grad, _ in members]
    # NOTE: the buffer is fresh (cat copies), so the all-reduce in place never writes into the
    # gradients that backward produced (stock's all-reduce also works on a copy).
    buffer = torch.cat([t.reshape(-1) for t in locals_])
    dist.all_reduce(buffer, op=_COALESCED_OPS[op], group=mesh.get_group(mesh_dim))
    offset = 0
    for (p, grad, spec), local in zip(members, locals_, strict=True):
        n = local.numel()
        reduced = buffer[offset : offset + n].view(local.shape)
        offset += n
        p.grad = _new(type(grad), reduced, spec, requires_grad=False)

