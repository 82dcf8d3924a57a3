"""Regression tests for what the OpInfo conformance run found, compared with stock DTensor bitwise
on both implementations, the path above dispatch on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import dtdispatch
from dtdispatch import FastDTensor
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch.testing import mesh_1d
from dtdispatch.testing.opinfo import compare, run_op

IMPLS = sorted(native.implementations())


def _worlds(*sizes: int) -> list[pytest.param]:  # type: ignore[valid-type]
    return [
        pytest.param(n, marks=pytest.mark.distributed(world_size=n, timeout=180), id=f"ws{n}")
        for n in sizes
    ]


def _copies(values: list[torch.Tensor], placements: list[list[object]], cls: type) -> list[DTensor]:
    out = []
    for v, p in zip(values, placements, strict=True):
        d = distribute_tensor(v, mesh_1d(), p, src_data_rank=None)  # type: ignore[arg-type]
        out.append(torch.Tensor._dtensor__new__(cls, d._local_tensor.clone(), d._spec,
                                                requires_grad=False))
    return out


@pytest.mark.parametrize("above", [True, False], ids=["above", "no-above"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", _worlds(1, 2))
def test_replicate_to_shard_chunk_keeps_torch_aliasing(
    rank: int, world_size: int, n: int, impl: str, above: bool
) -> None:
    """An op that mutates an argument it needs sharded (instance_norm's running stats, repeated
    and handed to native_batch_norm with the channels sharded): torch's Replicate -> Shard chunk
    is a view where it is contiguous, so the update writes through to the replicated tensor; a
    replayed plan must do the same (a copy dropped the running-stat update)."""
    dispatcher.install(impl, above=above)
    dtdispatch.clear_cache()
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(4, 6, 5, generator=gen), torch.randn(6, generator=gen),
              torch.rand(6, generator=gen)]
    placements = [[Shard(0)], [Replicate()], [Replicate()]]

    def run(x: DTensor, mean: DTensor, var: DTensor) -> DTensor:
        return F.instance_norm(x, mean, var, use_input_stats=True, momentum=0.3)

    stock = _copies(values, placements, DTensor)
    expected = run(*stock)
    for attempt in range(3):  # the plan, then replays
        fast = _copies(values, placements, FastDTensor)
        got = run(*fast)
        compare(expected, got, f"attempt {attempt} output")
        for i, (s, f) in enumerate(zip(stock, fast, strict=True)):
            compare(s, f, f"attempt {attempt} argument {i}")
    dispatcher.install(native.DEFAULT)


@pytest.mark.parametrize("n", _worlds(1, 2))
def test_opinfo_instance_norm(rank: int, world_size: int, n: int) -> None:
    """The OpInfo samples that found it, every configuration."""
    report = run_op("nn.functional.instance_norm", mesh_1d(), dtypes=[torch.float32],
                    max_samples=2, max_shardings=3)
    assert report.counts["forward passed"] > 0
    assert not report.unexpected(), report.summary()
