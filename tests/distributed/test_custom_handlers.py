"""torch's custom op handlers (``DTensor._op_dispatcher._custom_op_handlers``) are read live, on
both paths: ``loss_parallel()`` (which adds its handlers on entering the context and removes them
on leaving it), a handler registered after dtdispatch installed, and a replaced handler table (as
context parallel does). Every result is compared with stock DTensor bitwise, on both
implementations, with the path above dispatch on and off; a plan made while an op had no handler
must never be replayed while it has one, and the reverse."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

import dtdispatch
from dtdispatch import FastDTensor, dispatcher, native
from dtdispatch.testing import mesh_1d

IMPLS = sorted(native.implementations())
CASES = [(impl, above) for impl in IMPLS for above in (True, False)]
CASE_IDS = [f"{impl}-above_{'on' if above else 'off'}" for impl, above in CASES]

_handlers_owner = DTensor._op_dispatcher


def _install(impl: str, above: bool) -> None:
    dispatcher.install(impl, above=above)
    dtdispatch.clear_cache()
    dtdispatch.reset_stats()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same(fast: Any, stock: Any) -> None:
    """Bitwise stock's: FastDTensor for a DTensor, placements, shape, stride, dtype, local bytes."""
    assert isinstance(stock, DTensor), type(stock)
    assert isinstance(fast, FastDTensor), type(fast)
    assert fast.placements == stock.placements
    assert fast.shape == stock.shape and fast.stride() == stock.stride()
    assert fast.dtype == stock.dtype and fast.requires_grad == stock.requires_grad
    fl, sl = fast._local_tensor, stock._local_tensor
    assert fl.shape == sl.shape and fl.stride() == sl.stride() and fl.dtype == sl.dtype
    assert torch.equal(_bits(fl), _bits(sl))


def _outcome(fn: Callable[[], Any]) -> Any:
    """fn()'s result, or (exception type, message) when it raises."""
    try:
        return fn()
    except Exception as e:
        return (type(e), str(e))


def _same_outcome(fast: Any, stock: Any) -> None:
    if isinstance(stock, tuple):
        assert fast == stock
        return
    _same(fast, stock)


def _logits(placements: list[Any], *, fast: bool, grad: bool) -> DTensor:
    value = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    t = distribute_tensor(value, mesh_1d(), placements)
    if fast:
        t = dtdispatch.accelerate(t)
    return t.requires_grad_(grad)


def _target(kind: str, *, fast: bool) -> torch.Tensor:
    value = torch.randint(0, 8, (6,), generator=torch.Generator().manual_seed(4))
    if kind == "plain":
        return value
    t = distribute_tensor(value, mesh_1d(), [Replicate()])
    return dtdispatch.accelerate(t) if fast else t


def _loss_parallel_step(fast: bool, target: str, reduction: str) -> tuple[Any, Any]:
    logits = _logits([Shard(-1)], fast=fast, grad=True)
    with loss_parallel():
        loss = F.cross_entropy(logits, _target(target, fast=fast), reduction=reduction)
        (loss if reduction != "none" else loss.sum()).backward()
    return loss, logits.grad


@pytest.mark.parametrize(("impl", "above"), CASES, ids=CASE_IDS)
@pytest.mark.distributed(world_size=2, timeout=120)
def test_loss_parallel_cross_entropy(rank: int, world_size: int, impl: str, above: bool) -> None:
    """Cross entropy on Shard(-1) logits inside loss_parallel(): loss and gradient as stock's (the
    vocab-parallel handlers ran: stock's gradient stays Shard(1)), plain and DTensor targets, each
    twice (the second call meets whatever the first one cached)."""
    _install(impl, above)
    for target in ("plain", "dtensor"):
        for reduction in ("mean", "sum", "none"):
            stock_loss, stock_grad = _loss_parallel_step(False, target, reduction)
            assert stock_grad.placements == (Shard(1),)  # the handlers decided
            for _ in range(2):
                loss, grad = _loss_parallel_step(True, target, reduction)
                _same(loss, stock_loss)
                _same(grad, stock_grad)


@pytest.mark.parametrize(("impl", "above"), CASES, ids=CASE_IDS)
@pytest.mark.distributed(world_size=2, timeout=120)
def test_plans_do_not_cross_the_loss_parallel_context(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    """No-grad cross entropy on replicated logits: outside loss_parallel() the ordinary ops run
    (replayable above dispatch); inside it torch's handler refuses replicated logits. Calls
    alternate in and out of the context; each must give stock's outcome, so no plan made on one
    side is replayed on the other."""
    _install(impl, above)

    def call(fast: bool, inside: bool) -> Any:
        logits = _logits([Replicate()], fast=fast, grad=False)
        target = _target("dtensor", fast=fast)
        with torch.no_grad():
            if inside:
                with loss_parallel():
                    return _outcome(lambda: F.cross_entropy(logits, target))
            return _outcome(lambda: F.cross_entropy(logits, target))

    for inside in (False, False, True, True, False, True):
        stock = call(False, inside)
        if inside:
            assert isinstance(stock, tuple), "stock's handler accepts replicated logits"
        _same_outcome(call(True, inside), stock)
    if above:
        # The test is meaningful: outside the context the call is replayed above dispatch.
        assert dtdispatch.stats()["above"]["per_func"]["cross_entropy"]["hits"] > 0


@contextmanager
def _handler(op: Any, handler: Callable[..., Any], *, replace_table: bool) -> Iterator[None]:
    """``handler`` registered for ``op`` for the duration: added to torch's table in place, or (as
    context parallel does) by replacing the table with a new dict."""
    old = _handlers_owner._custom_op_handlers
    if replace_table:
        _handlers_owner._custom_op_handlers = {**old, op: handler}
    else:
        old[op] = handler
    try:
        yield
    finally:
        if replace_table:
            _handlers_owner._custom_op_handlers = old
        else:
            del old[op]


def _triple_neg(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DTensor:
    """A custom handler for aten.neg: -3x, computed on the local shard, stock DTensor output."""
    x = args[0]
    return torch.Tensor._dtensor__new__(  # type: ignore[no-any-return]
        DTensor, x._local_tensor * -3.0, x._spec, requires_grad=False
    )


@pytest.mark.parametrize("replace_table", [False, True], ids=["in_place", "replaced_table"])
@pytest.mark.parametrize(("impl", "above"), CASES, ids=CASE_IDS)
@pytest.mark.distributed(world_size=2, timeout=120)
def test_handler_registered_after_install(
    rank: int, world_size: int, impl: str, above: bool, replace_table: bool
) -> None:
    """A handler registered after install takes effect at once, on calls whose plans were cached
    before it (below and above dispatch), and stops at once when removed."""
    _install(impl, above)
    value = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))

    def call(fast: bool) -> Any:
        x = distribute_tensor(value, mesh_1d(), [Shard(0)])
        if fast:
            x = dtdispatch.accelerate(x)
        with torch.no_grad():
            return x.neg()

    plain = call(False)
    for _ in range(2):
        _same(call(True), plain)
    with _handler(torch.ops.aten.neg.default, _triple_neg, replace_table=replace_table):
        handled = call(False)
        assert torch.equal(handled._local_tensor, plain._local_tensor * 3.0)
        for _ in range(2):
            _same(call(True), handled)
    _same(call(True), plain)
    if above:
        assert dtdispatch.stats()["above"]["per_func"]["TensorBase.neg"]["hits"] > 0
