"""``cache.build_key`` against torch's own comparison key (ARCHITECTURE "The cache key"), and the
declared scalar-by-type deviation."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import dtdispatch
from dtdispatch import _native as native
from dtdispatch import cache
from dtdispatch.testing import mesh_1d

aten = torch.ops.aten
IMPLS = sorted(native.implementations())


def _calls(mesh: Any) -> list[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    def dt(
        placement: Any, shape: tuple[int, ...] = (8, 8), dtype: torch.dtype = torch.float32
    ) -> Any:
        return dtdispatch.accelerate(
            distribute_tensor(torch.ones(shape, dtype=dtype), mesh, [placement])
        )

    s0, s0b, r, s1 = dt(Shard(0)), dt(Shard(0)), dt(Replicate()), dt(Shard(1))
    s0_small, s0_half = dt(Shard(0), (4, 8)), dt(Shard(0), dtype=torch.float16)
    row = dt(Replicate(), (8,))
    p = dtdispatch.accelerate(DTensor.from_local(torch.ones(8, 8), mesh, [Partial()]))
    scalar = torch.tensor(2.0)
    scalar_int = torch.tensor(3)
    return [
        # Tensors: spec equality decides; a different tensor with the same spec shares the key.
        (aten.add.Tensor, (s0, s0), {}),
        (aten.add.Tensor, (s0, s0b), {}),
        (aten.add.Tensor, (s0, r), {}),
        (aten.add.Tensor, (s0, s1), {}),
        (aten.add.Tensor, (s0_small, s0_small), {}),
        (aten.add.Tensor, (s0_half, s0_half), {}),
        (aten.add.Tensor, (p, p), {}),
        (aten.add.Tensor, (s0, row), {}),
        # Pointwise scalars (value-free ops: keyed by type).
        (aten.add.Tensor, (s0, 2.0), {}),
        (aten.add.Tensor, (s0, 3.0), {}),
        (aten.add.Tensor, (s0, 3), {}),
        (aten.add.Tensor, (s0, True), {}),
        (aten.div.Tensor, (s0, 0.999), {}),
        (aten.div.Tensor, (s0, 0.998), {}),
        (aten.add.Tensor, (s0, s0), {"alpha": 2}),
        (aten.add.Tensor, (s0, s0), {"alpha": 3}),
        # Scalar tensors (rule 3).
        (aten.mul.Tensor, (s0, scalar), {}),
        (aten.mul.Tensor, (s0, torch.tensor(5.0)), {}),
        (aten.mul.Tensor, (s0, scalar_int), {}),
        # Static args (rule 5) by value.
        (aten.view.default, (s0, [64]), {}),
        (aten.view.default, (s0, [4, 16]), {}),
        (aten.view.default, (s0b, [64]), {}),
        (aten.sum.dim_IntList, (s0, [0]), {}),
        (aten.sum.dim_IntList, (s0, [1]), {}),
        (aten.sum.dim_IntList, (s0, [0], True), {}),
        (aten.sum.dim_IntList, (s0, [0], False), {}),
        (aten.transpose.int, (s0, 0, 1), {}),
        (aten.transpose.int, (s0, 1, 0), {}),
        (aten.native_layer_norm.default, (s0, [8], None, None, 1e-5), {}),
        (aten.native_layer_norm.default, (s0, [8], None, None, 1e-6), {}),
        (aten.native_layer_norm.default, (s0, [8], row, row, 1e-5), {}),
        # None positions (rule 5) and trailing-default length (rule 1).
        (aten.clamp.Tensor, (s0, None, s0), {}),
        (aten.clamp.Tensor, (s0, s0), {}),
        (aten.clamp.Tensor, (s0, s0, None), {}),
        # Lists (rule 4): length, elements, static non-tensor elements.
        (aten.cat.default, ([s0, s0],), {}),
        (aten.cat.default, ([s0, s0], 1), {}),
        (aten.cat.default, ([s0, s0, s0],), {}),
        (aten.cat.default, ([s0, r],), {}),
        (aten._foreach_add.Scalar, ([s0, r], 2.0), {}),
        (aten._foreach_add.Scalar, ([s0, r], 3.0), {}),
        (aten._foreach_add.ScalarList, ([s0, r], [1.0, 2.0]), {}),
        (aten._foreach_add.ScalarList, ([s0, r], [0.5, 2.5]), {}),
        (aten._foreach_add.List, ([s0, r], [s0, r]), {}),
        (aten._foreach_add.List, ([s0, r], [s0, s0]), {}),
        # kwargs (rule 6).
        (aten._to_copy.default, (s0,), {"dtype": torch.float16}),
        (aten._to_copy.default, (s0,), {"dtype": torch.float64}),
        (aten.empty_like.default, (s0,), {"dtype": torch.float16}),
        (aten.empty_like.default, (s0,), {}),
        (aten.clone.default, (s0,), {"memory_format": torch.contiguous_format}),
        (aten.clone.default, (s0,), {}),
    ]


def _canonical_scalars(op: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The declared deviation: for value-free ops, compare torch's keys with each scalar replaced
    by a fixed value of its type. The values differ across types (7 != 0.5 != True): like torch's
    C++ key (IValue tags), ours tells 2 from 2.0, which Python's == would not."""
    if op not in cache.scalar_value_free_ops():
        return args
    canon = {bool: True, int: 7, float: 0.5}

    def fix(a: Any) -> Any:
        if type(a) in canon:
            return canon[type(a)]
        if isinstance(a, list):
            return [fix(e) for e in a]
        return a

    return tuple(fix(a) for a in args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=1)
def test_keys_match_torch_comparison_keys(rank: int, world_size: int, impl: str) -> None:
    build_key = native.implementations()[impl].build_key
    calls = _calls(mesh_1d())
    ours = [build_key(op, args, kwargs) for op, args, kwargs in calls]
    theirs = [
        DTensor._op_dispatcher.unwrap_to_op_info(op, _canonical_scalars(op, args), kwargs).schema
        for op, args, kwargs in calls
    ]
    assert all(k is not None for k in ours)
    checked = 0
    for i, j in itertools.combinations(range(len(calls)), 2):
        if calls[i][0] != calls[j][0]:
            assert ours[i] != ours[j]
            continue
        same_torch = theirs[i] == theirs[j]
        same_ours = ours[i] == ours[j]
        assert same_ours == same_torch, (
            f"call {i} vs {j}: ours {same_ours}, torch {same_torch}: {calls[i]} / {calls[j]}"
        )
        if same_ours:
            assert hash(ours[i]) == hash(ours[j])
        checked += 1
    assert checked > 100


@pytest.mark.distributed(world_size=1)
def test_value_free_scalars_do_not_change_torch_decision(rank: int, world_size: int) -> None:
    """The justification of the deviation, checked against torch's propagator itself: for the
    pointwise ops, different scalar values of one type give identical sharding decisions and
    output metadata."""
    mesh = mesh_1d()
    propagator = DTensor._op_dispatcher.sharding_propagator
    x = distribute_tensor(torch.ones(8, 8), mesh, [Shard(0)])
    p = DTensor.from_local(torch.ones(8, 8), mesh, [Partial()])
    ops = [
        aten.add.Tensor,
        aten.mul.Tensor,
        aten.div.Tensor,
        aten.sub.Tensor,
        aten.pow.Tensor_Scalar,
        aten.mul_.Tensor,
        aten.lerp_.Scalar,
    ]
    assert set(ops[:4]) <= cache.scalar_value_free_ops()
    for op in ops:
        if op not in cache.scalar_value_free_ops():
            continue
        for t in (x, p):
            for values in ([2.0, -3.5, 0.0, 1e30], [2, -1, 0]):
                decisions = set()
                for v in values:
                    args = (t, t, v) if op == aten.lerp_.Scalar else (t, v)
                    schema = DTensor._op_dispatcher.unwrap_to_op_info(op, args, {}).schema
                    try:
                        out = propagator.propagate_op_sharding_non_cached(schema)
                    except (
                        RuntimeError
                    ) as exc:  # e.g. in-place on Partial: refused whatever the value
                        decisions.add(("raises", type(exc).__name__))
                        continue
                    redistribute = out.redistribute_schema
                    decisions.add(
                        (
                            str(out.output_spec),
                            out.needs_redistribute,
                            str(redistribute.args_spec) if redistribute else None,
                        )
                    )
                assert len(decisions) == 1, (op, t.placements, decisions)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=1)
def test_no_key_cases(rank: int, world_size: int, impl: str) -> None:
    build_key = native.implementations()[impl].build_key
    mesh = mesh_1d()
    s0 = dtdispatch.accelerate(distribute_tensor(torch.ones(8, 8), mesh, [Shard(0)]))
    # A plain multi-element tensor: torch's error (or implicit replication) is decided on the slow
    # path.
    assert build_key(aten.add.Tensor, (s0, torch.ones(8, 8)), {}) is None
    # No DTensor at all: torch's "no mesh" error comes from the slow path.
    assert build_key(aten.add.Tensor, (torch.tensor(1.0), torch.tensor(2.0)), {}) is None
    assert build_key(aten.add.Tensor, (s0, s0), {}) is not None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=1)
def test_values_torch_leaves_out_but_metadata_needs(rank: int, world_size: int, impl: str) -> None:
    """The second declared deviation: torch's key omits topk's ``k`` and ``view.dtype``'s dtype
    (both decide the output's metadata); ours keys every such value except floats (and lists of
    floats), which stay out as in torch."""
    build_key = native.implementations()[impl].build_key
    s0 = dtdispatch.accelerate(distribute_tensor(torch.ones(8, 8), mesh_1d(), [Shard(0)]))
    r = dtdispatch.accelerate(distribute_tensor(torch.ones(8, 8), mesh_1d(), [Replicate()]))

    def torch_key(op: Any, args: tuple[Any, ...]) -> Any:
        return DTensor._op_dispatcher.unwrap_to_op_info(op, args, {}).schema

    finer = [
        (aten.topk.default, (s0, 2, 1), (s0, 3, 1)),
        (aten.view.dtype, (s0, torch.int32), (s0, torch.float16)),
        (aten.histc.default, (r, 4), (r, 8)),
    ]
    for op, a, b in finer:
        assert torch_key(op, a) == torch_key(op, b), op  # torch's key cannot tell them apart
        assert build_key(op, a, {}) != build_key(op, b, {}), op
    same = [
        (aten.native_dropout.default, (s0, 0.1, True), (s0, 0.2, True)),
        (aten.fill_.Scalar, (s0, 0.5), (s0, 1.5)),
        (aten._foreach_mul.ScalarList, ([s0, r], [0.9, 0.8]), ([s0, r], [0.7, 0.6])),
    ]
    for op, a, b in same:
        assert torch_key(op, a) == torch_key(op, b), op
        assert build_key(op, a, {}) == build_key(op, b, {}), op
