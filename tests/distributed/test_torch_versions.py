"""What must hold on every supported torch, including torch < 2.13, where only the path above
dispatch runs (``make compat TORCH_COMPAT=2.11.0`` runs this file there; README, torch versions).

Each test compares a dtdispatch run with a stock DTensor run of the same program, bitwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import dtdispatch
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch.testing import mesh_1d


def _mlp(mesh: object) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    return parallelize_module(
        model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()}  # type: ignore[arg-type]
    )


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    return loss.detach()


@pytest.mark.distributed(world_size=2)
def test_training_matches_stock(rank: int, world_size: int) -> None:
    mesh = mesh_1d()
    stock = _mlp(mesh)
    fast = dtdispatch.accelerate(copy.deepcopy(stock))
    assert all(isinstance(p, dtdispatch.FastDTensor) for p in fast.parameters())
    assert all(isinstance(p, nn.Parameter) for p in fast.parameters())
    opt_s = torch.optim.AdamW(stock.parameters(), lr=0.01, foreach=True)
    opt_f = torch.optim.AdamW(fast.parameters(), lr=0.01, foreach=True)
    for i in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
        assert torch.equal(_step(stock, opt_s, x), _step(fast, opt_f, x))
    for p_s, p_f in zip(stock.parameters(), fast.parameters(), strict=True):
        assert p_f.placements == p_s.placements
        assert torch.equal(p_f.to_local(), p_s.to_local())
        assert p_f.grad is not None and p_s.grad is not None
        assert torch.equal(p_f.grad.to_local(), p_s.grad.to_local())
        assert isinstance(p_f, dtdispatch.FastDTensor)


@pytest.mark.distributed(world_size=2)
def test_no_grad_ops_replay_and_stay_fast(rank: int, world_size: int) -> None:
    dispatcher.install(native.DEFAULT)  # the defaults: earlier tests on these ranks may change them
    dtdispatch.clear_cache()
    mesh = mesh_1d()
    full = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    stock = distribute_tensor(full, mesh, [Shard(0)])
    weight = distribute_tensor(torch.ones(6, 6), mesh, [Replicate()])
    x = dtdispatch.accelerate(stock)
    w = dtdispatch.accelerate(weight)
    dtdispatch.reset_stats()
    with torch.no_grad():
        for _ in range(3):
            out = torch.relu(x @ w + 1.5).sum(dim=1)
            ref = torch.relu(stock @ weight + 1.5).sum(dim=1)
            assert isinstance(out, dtdispatch.FastDTensor) and type(ref) is DTensor
            assert out.placements == ref.placements
            assert torch.equal(out.to_local(), ref.to_local())
    above = dtdispatch.stats()["above"]
    # Each of the four calls misses once, then replays.
    assert above["misses"] == 4 and above["hits"] == 8, above


@pytest.mark.distributed(world_size=2)
def test_autograd_calls_keep_the_graph(rank: int, world_size: int) -> None:
    mesh = mesh_1d()
    full = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    stock = distribute_tensor(full, mesh, [Shard(0)]).requires_grad_()
    fast = dtdispatch.accelerate(distribute_tensor(full, mesh, [Shard(0)])).requires_grad_()
    out_s = (stock * 3).tanh().sum()
    out_f = (fast * 3).tanh().sum()
    assert isinstance(out_f, dtdispatch.FastDTensor)
    assert type(out_f.grad_fn).__name__ == type(out_s.grad_fn).__name__
    out_s.backward()
    out_f.backward()
    assert stock.grad is not None and fast.grad is not None
    assert torch.equal(fast.grad.to_local(), stock.grad.to_local())
    assert fast.grad.placements == stock.grad.placements


@pytest.mark.distributed(world_size=1)
def test_subclass_dispatch_probe_matches_torch(rank: int, world_size: int) -> None:
    """``_compat.SUBCLASS_DISPATCH`` (decided at import by a probe on an uninitialised mesh) says
    what this torch does with a DTensor subclass that overrides ``__torch_dispatch__`` on a real
    mesh: call the override (2.12.1 and later) or take torch's own path (2.11)."""
    from dtdispatch import _compat

    called: list[object] = []

    class _Recording(DTensor):
        @classmethod
        def __torch_dispatch__(  # type: ignore[override]
            cls, func: object, types: object, args: object = (), kwargs: object = None
        ) -> object:
            called.append(func)
            return NotImplemented

    stock = distribute_tensor(torch.ones(2, 2), mesh_1d(), [Replicate()])
    sub = torch.Tensor._dtensor__new__(
        _Recording, stock._local_tensor, stock._spec, requires_grad=False
    )
    try:
        torch.neg(sub)
    except TypeError:  # the override declined: torch's "Multiple dispatch failed"
        pass
    assert bool(called) is _compat.SUBCLASS_DISPATCH
    assert _compat._calls_subclass_dispatch() is _compat.SUBCLASS_DISPATCH
