"""Composites on the path above dispatch whose inner sizes the dispatch path rewrites (F.linear on a
3-D input flattens it with view sizes computed from the input), and transforms on mesh dimensions
of size 1, which torch skips. Both implementations, real ranks, bitwise against stock."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import Partial, Replicate, Shard

import dtdispatch
from dtdispatch import _dispatcher as dispatcher

from ._compare import IMPLS, install, pair, same


def _values(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_linear_on_a_sharded_3d_input_replays(rank: int, world_size: int, impl: str) -> None:
    """F.linear flattens its 3-D input with view sizes from the input's own shape: the dispatch
    path rewrites them (global -> local), a replay on the locals computes the local ones itself.
    Under inference mode its output is a fresh tensor; under no_grad a tracked view of its addmm
    result, which the replay makes as a view of that temporary (ARCHITECTURE 'What the key above
    dispatch holds')."""
    install(impl)
    sx, x = pair(_values(4, 3, 8, seed=0), [Shard(0)])
    sw, w = pair(_values(6, 8, seed=1), [Replicate()])
    sb, b = pair(_values(6, seed=2), [Replicate()])
    dtdispatch.reset_stats()
    with torch.inference_mode():
        for _ in range(3):
            same(F.linear(x, w, b), F.linear(sx, sw, sb))
    linear = dtdispatch.stats()["above"]["per_func"]["linear"]
    assert linear == {"hits": 2, "misses": 1, "negative": 0}, linear
    with torch.no_grad():
        for _ in range(3):
            same(F.linear(x, w, b), F.linear(sx, sw, sb))
    linear = dtdispatch.stats()["above"]["per_func"]["linear"]
    assert linear == {"hits": 4, "misses": 2, "negative": 0}, linear


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_a_view_given_global_sizes_never_replays(rank: int, world_size: int, impl: str) -> None:
    """The same flattening written by the caller with global sizes: the replay would pass those
    sizes to the local tensor, so it stays on the dispatch path."""
    install(impl)
    sx, x = pair(_values(4, 3, 8, seed=3), [Shard(0)])
    dtdispatch.reset_stats()
    with torch.no_grad():
        for _ in range(3):
            same(x.reshape(12, 8), sx.reshape(12, 8))
    above = dtdispatch.stats()["above"]
    assert above["hits"] == 0 and above["negative"] == {"rewritten arguments": 2}, above


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=1)
def test_transform_on_a_size_one_mesh_dim_is_dropped(rank: int, world_size: int, impl: str) -> None:
    """A rowwise linear's bias goes Replicate -> Partial; on a 1-rank mesh torch hands the local
    tensor back unchanged, so the plan is the native path's (no 'needs redistribution')."""
    _rowwise_linear(impl, expect_redistribution=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_transform_on_a_wider_mesh_dim_is_kept(rank: int, world_size: int, impl: str) -> None:
    _rowwise_linear(impl, expect_redistribution=True)


def _rowwise_linear(impl: str, *, expect_redistribution: bool) -> None:
    install(impl, above=False)  # the dispatch path's plan is under test
    sx, x = pair(_values(4, 8, seed=4), [Shard(1)])
    sw, w = pair(_values(6, 8, seed=5), [Shard(1)])
    sb, b = pair(_values(6, seed=6), [Replicate()])
    dtdispatch.reset_stats()
    try:
        for _ in range(3):
            same(F.linear(x, w, b), F.linear(sx, sw, sb))
    finally:
        dispatcher.install(impl)
    bailouts = dtdispatch.stats()["bailouts"]
    assert ("needs redistribution" in bailouts) is expect_redistribution, bailouts


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=1)
def test_list_arguments_drop_size_one_transforms(rank: int, world_size: int, impl: str) -> None:
    """Ops taking tensor lists (an optimizer's foreach ops on ``Partial`` gradients and
    ``Replicate`` states, ``stack`` of partial norms): on a 1-rank mesh every Partial -> Replicate
    is torch's no-op, so the plans are the native path's, bitwise stock's."""
    _list_arguments(impl, rank, expect_redistribution=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_list_arguments_keep_wider_transforms(rank: int, world_size: int, impl: str) -> None:
    _list_arguments(impl, rank, expect_redistribution=True)


def _list_arguments(impl: str, rank: int, *, expect_redistribution: bool) -> None:
    install(impl, above=False)  # the dispatch path's plan is under test
    grads = [pair(_values(4, 3, seed=10 + rank + i), [Partial()], local=True) for i in range(3)]
    states = [pair(_values(4, 3, seed=20 + i), [Replicate()]) for i in range(3)]
    sg, g = [s for s, _ in grads], [f for _, f in grads]
    ss, s = [s for s, _ in states], [f for _, f in states]
    dtdispatch.reset_stats()
    try:
        for _ in range(3):
            torch._foreach_lerp_(s, g, 0.1)
            torch._foreach_lerp_(ss, sg, 0.1)
            same(s, ss)
            same(torch._foreach_add(g, s), torch._foreach_add(sg, ss))
            same(torch.stack([g[0].sum(), s[1].sum()]), torch.stack([sg[0].sum(), ss[1].sum()]))
    finally:
        dispatcher.install(impl)
    bailouts = dtdispatch.stats()["bailouts_per_op"]
    for op in ("aten._foreach_lerp_.Scalar", "aten._foreach_add.List", "aten.stack.default"):
        redistributed = "needs redistribution" in bailouts.get(op, {})
        assert redistributed is expect_redistribution, (op, bailouts)
