"""torch.compile on dtdispatch tensors and accelerated modules.

Every case runs the same program twice, on stock DTensor and on dtdispatch, compiled the same way,
and compares outputs and gradients bitwise (both compiled runs execute the same traced program, so
anything but bitwise equality is a difference in what was traced). The compiled path is checked
for: no crash, forward + backward, later calls without recompiling (``error_on_recompile``),
``fullgraph=True``, gradients that stay FastDTensors. The eager path around a compiled region is
checked through ``dtdispatch.stats()``: the eager ops before and after it are counted by dtdispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import dtdispatch
from dtdispatch import FastDTensor
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch._tensor import AutogradFastDTensor
from dtdispatch.testing import mesh_1d

from ._compare import IMPLS, MLP, same


def _tp_mlp(*, fast: bool) -> nn.Module:
    torch.manual_seed(0)  # same weights for stock and dtdispatch
    model = parallelize_module(
        MLP(), mesh_1d(), {"up": ColwiseParallel(), "down": RowwiseParallel()}
    )
    return dtdispatch.accelerate(model) if fast else model


def _train_steps(
    model: nn.Module, *, backend: str, fullgraph: bool, steps: int = 3
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, type]]]:
    """Compile ``model``, run forward + backward ``steps`` times (recompiling after the first call
    is an error); per step: the output, the full gradients and their types."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
    results = []
    for step in range(steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out = compiled(x)
        out.sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((
            out.detach().clone(),
            {n: g.full_tensor().clone() for n, g in grads.items()},
            {n: type(g) for n, g in grads.items()},
        ))
    return results


def _check_against_stock(backend: str, *, fullgraph: bool) -> None:
    stock = _train_steps(_tp_mlp(fast=False), backend=backend, fullgraph=fullgraph)
    dtdispatch.reset_stats()
    fast = _train_steps(_tp_mlp(fast=True), backend=backend, fullgraph=fullgraph)
    # The trace went through dtdispatch (FastDTensor.__torch_dispatch__ on fake tensors).
    assert dtdispatch.stats()["hits"] + dtdispatch.stats()["misses"] > 0
    for (out_s, grads_s, _), (out_f, grads_f, types_f) in zip(stock, fast, strict=True):
        assert type(out_s) is torch.Tensor  # RowwiseParallel: a local output
        same(out_f, out_s, "output")
        assert grads_f.keys() == grads_s.keys()
        for name in grads_s:
            same(grads_f[name], grads_s[name], name)
        # Gradients stay on dtdispatch, so the optimizer step runs there in eager.
        assert all(issubclass(t, FastDTensor) for t in types_f.values()), types_f


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2, timeout=180)
def test_compiled_tp_module_aot_eager(rank: int, world_size: int, impl: str) -> None:
    dispatcher.install(impl)
    _check_against_stock("aot_eager", fullgraph=True)


@pytest.mark.distributed(world_size=1, timeout=300)
def test_compiled_tp_module_inductor(rank: int, world_size: int) -> None:
    # NOTE: native only, and world size 1: an inductor compile (C++ kernels) costs tens of seconds
    # on the 2-core VM; the aot_eager case above covers both implementations and two ranks.
    import torch._inductor.config as inductor_config

    dispatcher.install(native.DEFAULT)
    # No compile-worker pool: it would outlive the test in the rank process.
    with inductor_config.patch(compile_threads=1):
        _check_against_stock("inductor", fullgraph=True)


def _program(
    x: DTensor, w: DTensor, w2: DTensor, region: Callable[..., torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """eager -> compiled ``region`` -> eager, forward and backward; the loss, x's gradient, and
    dtdispatch's per-op counts (calls) seen right after the compiled region and at the end."""
    calls_before = _calls()
    h = x * 2.0  # eager, before the region
    calls_before_region = _calls()
    y = region(h, w)
    calls_after_region = _calls()
    loss = (y * w2).sum()  # eager, after the region
    calls_after_eager = _calls()
    loss.backward()
    assert x.grad is not None
    return loss.full_tensor(), x.grad.full_tensor(), {
        "region_output": type(y), "before": calls_before, "before_region": calls_before_region,
        "after_region": calls_after_region, "after_eager": calls_after_eager,
    }


def _calls() -> int:
    s = dtdispatch.stats()["per_op"].get("aten.mul.Tensor", {"hits": 0, "misses": 0})
    return int(s["hits"] + s["misses"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2, timeout=180)
def test_eager_around_compiled_region(rank: int, world_size: int, impl: str) -> None:
    dispatcher.install(impl)
    mesh = mesh_1d()
    torch.manual_seed(1)
    x0, w0, w20 = torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8)

    def region(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.relu(a @ b) * 3.0

    def inputs(fast: bool) -> tuple[DTensor, DTensor, DTensor]:
        conv: Callable[[DTensor], DTensor] = dtdispatch.accelerate if fast else (lambda t: t)
        return (
            conv(distribute_tensor(x0, mesh, [Shard(0)])).requires_grad_(),
            conv(distribute_tensor(w0, mesh, [Replicate()])),
            conv(distribute_tensor(w20, mesh, [Shard(0)])),
        )

    results = {}
    for fast in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(region, backend="aot_eager", fullgraph=True)
        for step in range(2):  # the second call must reuse the compiled region
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                results[fast, step] = _program(*inputs(fast), compiled)
    for step in range(2):
        loss_s, grad_s, _ = results[False, step]
        loss_f, grad_f, seen = results[True, step]
        assert torch.equal(loss_f, loss_s) and torch.equal(grad_f, grad_s)
        # dtdispatch runs the eager code before the region, and after it: the region hands it a
        # FastDTensor. A compiled call runs the compiled graph on local tensors: once compiled
        # (step 1), the region adds no dispatch.
        assert issubclass(seen["region_output"], FastDTensor)
        assert seen["before_region"] == seen["before"] + 1
        assert seen["after_eager"] == seen["after_region"] + 1
        if step == 1:
            assert seen["after_region"] == seen["before_region"]

    # Stock inputs into the compiled region, dtdispatch around it: the region was traced with
    # plain DTensor gradients and receives a FastDTensor one, which must be coerced, not refused.
    torch._dynamo.reset()
    compiled = torch.compile(region, backend="aot_eager")
    x, w, w2 = inputs(False)
    y = compiled(x * 2.0, w)
    assert type(y) is DTensor
    (y * dtdispatch.accelerate(w2)).sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad.full_tensor(), results[False, 0][1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2, timeout=180)
def test_compiled_fast_dtensor_methods(rank: int, world_size: int, impl: str) -> None:
    """FastDTensor's own redistribute / to_local / full_tensor / from_local inside a fullgraph
    region: Dynamo cannot trace their eager form (grad_fn hooks), so they take their compiled
    form, with the same values and FastDTensor gradients."""
    dispatcher.install(impl)
    mesh = mesh_1d()

    def region(a: DTensor) -> torch.Tensor:
        r = a.redistribute(mesh, [Replicate()])  # an all-gather at world size 2
        local = (r * 2.0).to_local().sum()
        again = type(a).from_local(r.to_local() * 3.0, mesh, [Replicate()])
        return local + again.full_tensor().sum() + (a * a).full_tensor().sum()

    results = {}
    for fast in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(region, backend="aot_eager", fullgraph=True)
        a = distribute_tensor(torch.arange(16.0).reshape(4, 4), mesh, [Shard(0)])
        a = (dtdispatch.accelerate(a) if fast else a).requires_grad_()
        for step in range(2):
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                out = compiled(a)
            out.backward()
        assert a.grad is not None
        results[fast] = (out.detach(), a.grad.full_tensor(), type(a.grad))
    assert torch.equal(results[True][0], results[False][0])
    assert torch.equal(results[True][1], results[False][1])
    assert issubclass(results[True][2], FastDTensor)


class _MaskedAttention(nn.Module):
    """One attention head pair, heads sharded (colwise q/k/v, rowwise output); the causal mask is
    a plain tensor added to DTensor scores under ``implicit_replication``."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8, bias=False)
        self.k = nn.Linear(8, 8, bias=False)
        self.v = nn.Linear(8, 8, bias=False)
        self.o = nn.Linear(8, 8, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((4, 4), float("-inf")), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, 2, 4).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        with implicit_replication():
            scores = q @ k.transpose(-2, -1) / 2.0 + self.mask
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, 8)
        return self.o(out)


def _attention_training(*, fast: bool, steps: int = 3) -> list[tuple[torch.Tensor, ...]]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    colwise = ColwiseParallel(use_local_output=False)
    plan = {"q": colwise, "k": colwise, "v": colwise, "o": RowwiseParallel()}
    model: nn.Module = parallelize_module(_MaskedAttention(), mesh_1d(), plan)
    if fast:
        model = dtdispatch.accelerate(model)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    results = []
    for step in range(steps):
        x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(10 + step))
        opt.zero_grad()
        loss = compiled(x).pow(2).mean()
        loss.backward()
        opt.step()
        results.append((
            loss.detach().clone(),
            *(p.grad.full_tensor().clone() for p in model.parameters()),  # type: ignore[union-attr]
            *(p.full_tensor().clone() for p in model.parameters()),  # type: ignore[attr-defined]
        ))
    if fast:
        assert {type(p) for p in model.parameters()} == {AutogradFastDTensor}
    return results


@pytest.mark.parametrize("above", [True, False], ids=["above_on", "above_off"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2, timeout=240)
def test_compiled_attention_with_implicit_replication(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    """torch.compile (aot_eager) around attention whose plain-tensor mask joins DTensor scores
    under implicit_replication(), trained for three steps: loss, gradients and parameters are
    stock's bits. (implicit_replication breaks Dynamo's graph, so dtdispatch's own frames run
    under Dynamo's frame hook: they must never be compiled.)"""
    dispatcher.install(impl, above=above)
    stock = _attention_training(fast=False)
    fast = _attention_training(fast=True)
    for step, (s, f) in enumerate(zip(stock, fast, strict=True)):
        same(f, s, f"step {step}")


@pytest.mark.parametrize("above", [True, False], ids=["above_on", "above_off"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2, timeout=180)
def test_compiled_no_grad_implicit_replication(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    """A no-grad compiled ``(q + torch.ones(4)).sum()`` under implicit_replication, called three
    times: stock's placements and bits each time."""
    dispatcher.install(impl, above=above)
    value = torch.randn(4, 4, generator=torch.Generator().manual_seed(11))

    def region(q: torch.Tensor) -> torch.Tensor:
        with implicit_replication():
            return (q + torch.ones(4)).sum()

    results = {}
    for fast in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(region, backend="aot_eager")
        q = distribute_tensor(value, mesh_1d(), [Shard(0)])
        if fast:
            q = dtdispatch.accelerate(q)
        with torch.no_grad():
            results[fast] = [compiled(q) for _ in range(3)]
    for s, f in zip(results[False], results[True], strict=True):
        assert type(s) is DTensor
        same(f, s)
