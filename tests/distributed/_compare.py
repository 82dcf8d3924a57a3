"""What the distributed tests share: the dtdispatch configurations they run under, stock/dtdispatch
pairs of inputs, and the bitwise comparison of a dtdispatch result with stock DTensor's.

The comparison is the test oracle, so it reads results without going through dtdispatch: metadata
under ``torch._C.DisableTorchFunctionSubclass()`` (no call reaches ``FastDTensor``'s handler, so a
comparison never plans, replays, evicts or counts anything) and values as bytes
(``dtdispatch.testing._bits``), never through ``dtdispatch._bitwise``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

import dtdispatch
from dtdispatch import FastDTensor
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch.testing import mesh_1d
from dtdispatch.testing._bits import bits, placement_fields

IMPLS = sorted(native.implementations())
"""This build's implementations: ``"native"`` (the C extension, when built) and ``"python"``."""
VARIANTS = [(impl, above) for impl in IMPLS for above in (True, False)]
"""Every (implementation, path above dispatch on or off), for ``parametrize(("impl", "above"))``."""
IDS = [f"{impl}-above" if above else f"{impl}-below" for impl, above in VARIANTS]
"""Test ids of ``VARIANTS``."""


def install(impl: str, above: bool = True) -> None:
    """Select ``impl`` with the path above dispatch on or off, empty caches and zeroed counters
    (ranks outlive tests)."""
    dispatcher.install(impl, above=above)
    dtdispatch.clear_cache()
    dtdispatch.reset_stats()


@contextmanager
def variant(impl: str, above: bool) -> Iterator[None]:
    """``install(impl, above)`` for the duration; the default implementation (above dispatch on)
    again afterwards, for the tests that run next on these ranks."""
    install(impl, above)
    try:
        yield
    finally:
        dispatcher.install(native.DEFAULT)


def pair(
    value: torch.Tensor,
    placements: list[Any],
    *,
    mesh: Any = None,
    requires_grad: bool = False,
    local: bool = False,
) -> tuple[DTensor, Any]:
    """(stock, fast): ``value`` distributed on ``mesh`` (default ``mesh_1d()``) as a stock DTensor
    (with ``local``, ``value`` is this rank's local tensor, as ``Partial`` placements need), and a
    FastDTensor leaf with the same spec on a copy of its local shard (so in-place ops on one never
    reach the other); both require grad if asked."""
    mesh = mesh if mesh is not None else mesh_1d()
    if local:
        stock = DTensor.from_local(value, mesh, placements, run_check=False)
    else:
        stock = distribute_tensor(value, mesh, placements)
    fast = dtdispatch.accelerate(
        torch.Tensor._dtensor__new__(
            DTensor, stock._local_tensor.clone(), stock._spec, requires_grad=False
        )
    )
    if requires_grad:
        stock.requires_grad_()
        fast.requires_grad_()
    return stock, fast


def _meta(t: torch.Tensor) -> tuple[Any, ...]:
    return (
        t.shape,
        t.stride(),
        t.dtype,
        t.device,
        t.requires_grad,
        t.is_conj(),
        t.is_neg(),
        t.is_inference(),
        t._is_view(),
    )


def _spec(t: DTensor) -> tuple[Any, ...]:
    """The spec as ``DTensorSpec.__eq__`` compares it (mesh, placements, shard order, shape,
    stride, dtype), with a ``_MaskPartial``'s mask compared by value (``placement_fields``)."""
    spec = t._spec
    meta = spec.tensor_meta
    return (
        spec.mesh,
        [placement_fields(p) for p in spec.placements],
        spec.shard_order,
        None if meta is None else (meta.shape, meta.stride, meta.dtype),
    )


META = "shape, stride, dtype, device, requires_grad, conj, neg, is_inference, _is_view"


def same(fast: Any, stock: Any, where: str = "") -> None:
    """Assert ``fast`` (a dtdispatch result) is bitwise ``stock`` (stock DTensor's).

    A DTensor must come back as a FastDTensor with stock's spec (mesh, placements, shard order,
    global shape, stride, dtype); a DTensor and its local tensor, or a plain tensor, with stock's
    ``META`` and bytes. Lists and tuples recurse (same type and length); a float must have stock's
    ``repr`` (NaN equals NaN, -0.0 differs from 0.0); anything else must be of stock's type and
    ``==``. ``where`` prefixes the failure message."""
    with torch._C.DisableTorchFunctionSubclass():
        _same(fast, stock, where)


def _same(fast: Any, stock: Any, where: str) -> None:
    if isinstance(stock, DTensor):
        assert isinstance(fast, FastDTensor), (where, type(fast))
        assert _meta(fast) == _meta(stock), (where, META, _meta(fast), _meta(stock))
        _same(fast._local_tensor, stock._local_tensor, f"{where} local")
        # The spec decides the next op's sharding; it may differ from the wrapper's own metadata.
        assert _spec(fast) == _spec(stock), (where, fast._spec, stock._spec)
    elif isinstance(stock, torch.Tensor):
        assert type(fast) is type(stock), (where, type(fast), type(stock))
        assert _meta(fast) == _meta(stock), (where, META, _meta(fast), _meta(stock))
        assert torch.equal(bits(fast), bits(stock)), (where, fast, stock)
    elif isinstance(stock, (tuple, list)):
        assert type(fast) is type(stock) and len(fast) == len(stock), (where, fast, stock)
        for i, (f, s) in enumerate(zip(fast, stock, strict=True)):
            _same(f, s, f"{where}[{i}]")
    elif isinstance(stock, float):
        assert type(fast) is float and repr(fast) == repr(stock), (where, fast, stock)
    else:
        assert type(fast) is type(stock) and fast == stock, (where, fast, stock)


Outcome = tuple[str, Any]
"""("ok", the result) or ("raised", the exception)."""


def outcome(fn: Callable[..., Any], *args: Any) -> Outcome:
    """``fn(*args)``'s result, or the exception it raised."""
    try:
        return "ok", fn(*args)
    except Exception as exc:  # compared with stock's by same_outcome
        return "raised", exc


def same_outcome(fast: Outcome, stock: Outcome, where: str = "") -> None:
    """Assert that both returned and the results are ``same``, or both raised an exception of the
    same type with the same message."""
    assert fast[0] == stock[0], (where, fast, stock)
    if stock[0] == "raised":
        assert type(fast[1]) is type(stock[1]), (where, fast[1], stock[1])
        assert str(fast[1]) == str(stock[1]), (where, fast[1], stock[1])
    else:
        same(fast[1], stock[1], where)


class MLP(nn.Module):
    """Linear(8, 16), ReLU, Linear(16, 8), as ``up`` and ``down`` (for Colwise/Rowwise plans)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))  # type: ignore[no-any-return]
