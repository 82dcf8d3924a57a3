"""Vocab-parallel embedding lookups alive at the same time.

torch caches the ``_MaskPartial`` placement of a row-sharded embedding with its sharding decision,
so every lookup shares one mask buffer and a second lookup before the first output is reduced
raises "MaskBuffer has been materialized with conflicting data". dtdispatch gives each call its
own mask (``local_results._fresh_masks``). References here are single-process ``F.embedding`` on
the full weight; integer-valued floats make every sum exact, so comparisons are bitwise.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _MaskPartial

import dtdispatch
from dtdispatch import FastDTensor, cache
from dtdispatch import _dispatcher as dispatcher
from dtdispatch.testing import mesh_1d

from ._compare import IMPLS, outcome, same_outcome

aten = torch.ops.aten

VOCAB, DIM = 11, 3  # 11 rows: uneven shards on 2 and 4 ranks
INDICES = [
    torch.tensor([[0, 7, 3], [10, 3, 3]]),
    torch.tensor([[9, 1, 5], [2, 2, 8]]),
    torch.tensor([[4, 6, 10], [0, 0, 1]]),
]


def _weight() -> torch.Tensor:
    return torch.arange(VOCAB * DIM, dtype=torch.float32).reshape(VOCAB, DIM) - 7.0


def _upstream(k: int) -> torch.Tensor:
    """An integer-valued upstream gradient for lookup ``k``."""
    return (torch.arange(2 * 3 * DIM, dtype=torch.float32).reshape(2, 3, DIM) % 5) - 2.0 + k


def _reference() -> tuple[list[torch.Tensor], torch.Tensor]:
    weight = _weight().requires_grad_()
    outs = [F.embedding(i, weight) for i in INDICES]
    sum((o * _upstream(k)).sum() for k, o in enumerate(outs)).backward()  # type: ignore[union-attr]
    return [o.detach() for o in outs], weight.grad  # type: ignore[return-value]


def _stock_grad_placements(mesh: Any) -> tuple[Any, ...]:
    """The weight gradient's placements stock gives for one lookup (which stock supports)."""
    weight = distribute_tensor(_weight(), mesh, [Shard(0)]).requires_grad_()
    out = F.embedding(distribute_tensor(INDICES[0], mesh, [Replicate()]), weight)
    (out.full_tensor() * _upstream(0)).sum().backward()
    return cast(DTensor, weight.grad).placements


def _check_overlapping_lookups(impl: str) -> None:
    dispatcher.install(impl)
    dtdispatch.clear_cache()
    dtdispatch.reset_stats()
    mesh = mesh_1d()
    expected, expected_grad = _reference()
    weight = dtdispatch.accelerate(distribute_tensor(_weight(), mesh, [Shard(0)]).requires_grad_())
    indices = [dtdispatch.accelerate(distribute_tensor(i, mesh, [Replicate()])) for i in INDICES]
    for _round in range(2):  # the first round plans, the second replays the cached plan
        weight.grad = None
        # Two lookups, then both reductions.
        first, second = F.embedding(indices[0], weight), F.embedding(indices[1], weight)
        assert isinstance(first, FastDTensor)
        assert isinstance(first.placements[0], _MaskPartial)
        assert first.placements[0].mask_buffer is not second.placements[0].mask_buffer
        assert torch.equal(second.full_tensor(), expected[1])
        assert torch.equal(first.full_tensor(), expected[0])
        # Lookups in a loop, the reductions after it; then the backward of all of them.
        outs = [F.embedding(i, weight) for i in indices]
        fulls = [o.full_tensor() for o in outs]
        for got, want in zip(fulls, expected, strict=True):
            assert torch.equal(got, want)
        sum((f * _upstream(k)).sum() for k, f in enumerate(fulls)).backward()  # type: ignore[union-attr]
        grad = weight.grad
        assert isinstance(grad, DTensor) and grad.placements == _stock_grad_placements(mesh)
        assert torch.equal(grad.full_tensor(), expected_grad)
    # The cached plan holds no per-call state: its mask template was never filled.
    entries = cache.thread_cache().entries.values()
    plans = [p for p in entries if p.op_call == aten.embedding.default]
    assert len(plans) == 1 and not plans[0].fast and plans[0].reason == "mask per call"
    for template in plans[0].masks:
        assert template.mask_buffer.data is None and template.mask_buffer.refcount == 0
    assert dtdispatch.stats()["per_op"]["aten.embedding.default"]["hits"] == 2 * (2 + 3) - 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_overlapping_lookups_2_ranks(rank: int, world_size: int, impl: str) -> None:
    _check_overlapping_lookups(impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=4)
def test_overlapping_lookups_4_ranks(rank: int, world_size: int, impl: str) -> None:
    _check_overlapping_lookups(impl)


@pytest.mark.distributed(world_size=2)
def test_stock_raises_on_overlapping_lookups(rank: int, world_size: int) -> None:
    """The deviation the README declares: stock DTensor refuses the same program."""
    mesh = mesh_1d()
    weight = distribute_tensor(_weight()[:, :2], mesh, [Shard(0)])  # a shape no other test uses
    first = F.embedding(distribute_tensor(INDICES[0], mesh, [Replicate()]), weight)
    with pytest.raises(RuntimeError, match="MaskBuffer has been materialized with conflicting"):
        F.embedding(distribute_tensor(INDICES[1], mesh, [Replicate()]), weight)
    # Reducing the first output releases the buffer torch cached, so later stock lookups work.
    assert torch.equal(first.full_tensor(), F.embedding(INDICES[0], _weight()[:, :2]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_rowwise_parallel_embedding_module(rank: int, world_size: int, impl: str) -> None:
    dispatcher.install(impl)
    dtdispatch.clear_cache()
    reference = nn.Embedding(VOCAB, DIM)
    with torch.no_grad():
        reference.weight.copy_(_weight())
    model = parallelize_module(
        nn.Embedding(VOCAB, DIM),
        mesh_1d(),
        RowwiseParallel(input_layouts=Replicate(), use_local_output=False),
    )
    with torch.no_grad():
        model.weight.copy_(distribute_tensor(_weight(), mesh_1d(), [Shard(0)]))
    dtdispatch.accelerate(model)
    for _round in range(2):
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        outs: list[Any] = [model(i) for i in INDICES]
        want = [reference(i) for i in INDICES]
        for got, ref in zip(outs, want, strict=True):
            assert isinstance(got, FastDTensor) and got.placements == (Replicate(),)
            assert torch.equal(got.full_tensor(), ref)
        sum((o.full_tensor() * _upstream(k)).sum() for k, o in enumerate(outs)).backward()  # type: ignore[union-attr]
        sum((o * _upstream(k)).sum() for k, o in enumerate(want)).backward()  # type: ignore[union-attr]
        assert torch.equal(model.weight.grad.full_tensor(), reference.weight.grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_ops_on_unreduced_outputs(rank: int, world_size: int, impl: str) -> None:
    """Ops on a lookup's output before its reduction behave as in stock (the result bitwise,
    or the exception), and no cached key holds the per-call mask."""
    dispatcher.install(impl)
    dtdispatch.clear_cache()
    mesh = mesh_1d()
    ops = [
        lambda e: e * 2.0,
        lambda e: e.clone(),
        lambda e: -e,
        lambda e: e + e,  # stock: AssertionError (the shared buffer is released by the first arg)
    ]
    # NOTE: no e.sum(): stock raises IndexError reducing it and leaves its cached mask buffer
    # materialized, which changes what later stock lookups of this shape do (e + e then passes).
    for fn in ops:
        outcomes = []
        for fast in (False, True):
            weight = distribute_tensor(_weight(), mesh, [Shard(0)])
            indices = distribute_tensor(INDICES[0], mesh, [Replicate()])
            if fast:
                weight = dtdispatch.accelerate(weight)
            outcomes.append(outcome(lambda: fn(F.embedding(indices, weight))))  # noqa: B023
        same_outcome(outcomes[1], outcomes[0])
    for key in cache.thread_cache().entries:
        for entry in key:
            if isinstance(entry, DTensorSpec):
                assert not any(isinstance(p, _MaskPartial) for p in entry.placements), key


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_overlapping_gathers(rank: int, world_size: int, impl: str) -> None:
    """torch's gather rule uses the same ``_MaskPartial`` (input sharded on the gather dim, index
    of size 1 there): two gathers alive at once, twice (plan, then replay)."""
    dispatcher.install(impl)
    dtdispatch.clear_cache()
    mesh = mesh_1d()
    full = _weight()
    x = dtdispatch.accelerate(distribute_tensor(full, mesh, [Shard(0)]))
    index_values = [torch.tensor([[3, 10, 0]]), torch.tensor([[8, 1, 5]])]
    index = [dtdispatch.accelerate(distribute_tensor(i, mesh, [Replicate()])) for i in index_values]
    for _round in range(2):
        outs = [torch.gather(x, 0, i) for i in index]
        assert all(isinstance(o.placements[0], _MaskPartial) for o in outs)
        for out, i in zip(outs, index_values, strict=True):
            assert torch.equal(out.full_tensor(), torch.gather(full, 0, i))
