"""torch's ``CommDebugMode`` counts the collectives of programs on FastDTensors exactly as on stock
DTensor: implicit redistributions on the dispatch path (forward and backward), torch's custom
handlers (loss_parallel), explicit DTensor API calls and tensor-parallel modules. Per collective,
in total, and per module and pass; on both implementations, with the path above dispatch on and
off; each dtdispatch program runs twice (the second run replays cached plans)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)

import dtdispatch
from dtdispatch import _dispatcher as dispatcher
from dtdispatch.testing import mesh_1d

from ._compare import IDS, MLP, VARIANTS


def _dt(seed: int, shape: tuple[int, ...], placements: list[Any], fast: bool) -> DTensor:
    value = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    t = distribute_tensor(value, mesh_1d(), placements)
    return dtdispatch.accelerate(t) if fast else t


def _matmul_backward(fast: bool) -> Callable[[], Any]:
    """Shard(0) @ Shard(0): an all-gather in forward, more in backward."""
    a = _dt(0, (4, 6), [Shard(0)], fast).requires_grad_()
    b = _dt(1, (6, 4), [Shard(0)], fast).requires_grad_()

    def run() -> Any:
        c = a @ b
        (c + c.t()).sum().backward()
        return a.grad

    return run


def _partial_plus_replicate(fast: bool) -> Callable[[], Any]:
    """Shard(1) @ Shard(0) is Partial; adding a Replicate bias all-reduces it; a Shard(0) addend
    reduce-scatters the next Partial. No grad: the path above dispatch sees these calls."""
    x = _dt(2, (4, 8), [Shard(1)], fast)
    w = _dt(3, (8, 4), [Shard(0)], fast)
    bias = _dt(4, (4,), [Replicate()], fast)
    rows = _dt(5, (4, 4), [Shard(0)], fast)

    def run() -> Any:
        with torch.no_grad():
            return (x @ w + bias, (x @ w) + rows)

    return run


def _api_calls(fast: bool) -> Callable[[], Any]:
    """Explicit redistributions: redistribute (to Replicate, to Shard from Partial), full_tensor,
    with a backward."""
    x = _dt(6, (4, 4), [Shard(0)], fast).requires_grad_()
    partial = dtdispatch.accelerate(
        DTensor.from_local(torch.ones(4, 4), mesh_1d(), [Partial()])
    ) if fast else DTensor.from_local(torch.ones(4, 4), mesh_1d(), [Partial()])

    def run() -> Any:
        r = x.redistribute(mesh_1d(), [Replicate()])
        s = partial.redistribute(mesh_1d(), [Shard(1)])
        (r * 2).full_tensor().sum().backward()
        return s

    return run


def _tp_mlp(fast: bool) -> Callable[[], Any]:
    """Colwise/Rowwise TP MLP, forward and backward, with sequence-sharded input."""
    torch.manual_seed(0)
    model = parallelize_module(
        MLP(),
        mesh_1d(),
        {"up": ColwiseParallel(input_layouts=Shard(0)), "down": RowwiseParallel()},
    )
    if fast:
        model = dtdispatch.accelerate(copy.deepcopy(model))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))

    def run() -> Any:
        out = model(x)
        out.sum().backward()
        return out

    return run


def _loss_parallel(fast: bool) -> Callable[[], Any]:
    """Cross entropy on Shard(-1) logits inside loss_parallel(): torch's handlers all-reduce."""
    logits = _dt(8, (6, 8), [Shard(-1)], fast).requires_grad_()
    target = torch.randint(0, 8, (6,), generator=torch.Generator().manual_seed(9))

    def run() -> Any:
        with loss_parallel():
            loss = F.cross_entropy(logits, target)
            loss.backward()
        return loss

    return run


PROGRAMS: dict[str, Callable[[bool], Callable[[], Any]]] = {
    "matmul backward": _matmul_backward,
    "partial plus replicate": _partial_plus_replicate,
    "api calls": _api_calls,
    "tp mlp": _tp_mlp,
    "loss parallel": _loss_parallel,
}


def _counts(run: Callable[[], Any]) -> dict[str, Any]:
    with CommDebugMode() as mode:
        run()
    modules = {
        name: {
            passname: {str(op): n for op, n in counts.items() if n}
            for passname, counts in per_pass.items()
        }
        for name, per_pass in mode.comm_module_counts.items()
    }
    return {
        "per collective": {str(op): n for op, n in mode.get_comm_counts().items()},
        "total": mode.get_total_counts(),
        "per module": modules,
    }


@pytest.mark.parametrize("program", list(PROGRAMS))
@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2, timeout=120)
def test_comm_counts_match_stock(
    rank: int, world_size: int, impl: str, above: bool, program: str
) -> None:
    dispatcher.install(impl, above=above)
    dtdispatch.clear_cache()
    make = PROGRAMS[program]
    stock = _counts(make(False))
    assert stock["total"] > 0  # the program communicates
    fast_run = make(True)
    for _ in range(2):
        assert _counts(fast_run) == stock
