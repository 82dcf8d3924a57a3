"""Accelerated modules keep their parameters as stock keeps them, on real ranks: ``accelerate`` and
``to_torch`` retype parameters in place (identity, optimizer, hooks and ties survive), modules built
on the meta device and materialized later, tied embedding / LM-head weights (tensor parallel, and
FSDP2 with ``get_state_dict``), pickling and ``torch.save`` of parameters, state dicts and modules.
Every result is compared with stock DTensor, bitwise; both implementations, the path above dispatch
on and off.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import (
    DTensor,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import dtdispatch
from dtdispatch import FastDTensor
from dtdispatch._tensor import AutogradFastDTensor
from dtdispatch.testing import mesh_1d
from dtdispatch.testing.training import TrainConfig, Trainer

from ._compare import IDS, VARIANTS, same, variant

VOCAB, DIM, HIDDEN = 16, 8, 16


class LM(nn.Module):
    """Embedding, a norm, an MLP and an LM head (optionally tied to the embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.w1 = nn.Linear(DIM, HIDDEN)
        self.w2 = nn.Linear(HIDDEN, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids))
        out: torch.Tensor = self.head(self.w2(F.gelu(self.w1(h))))
        return out

    def init_weights(self) -> None:
        """torchtitan's way: normal / truncated normal for weights, zeros for biases, the norm's
        own reset (in place on the DTensor parameters)."""
        nn.init.normal_(self.embed.weight)
        for lin in (self.w1, self.w2):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=0.02)
            nn.init.zeros_(lin.bias)
        self.norm.reset_parameters()
        nn.init.trunc_normal_(self.head.weight, std=DIM**-0.5, a=-3.0, b=3.0)


def _parallelize(model: LM, *, tie: bool) -> LM:
    mesh = mesh_1d()
    parallelize_module(
        model,
        mesh,
        {
            "embed": RowwiseParallel(input_layouts=Replicate(), use_local_output=False),
            "w1": ColwiseParallel(use_local_output=False),
            "w2": RowwiseParallel(use_local_output=False),
            "head": ColwiseParallel(output_layouts=Replicate(), use_local_output=False),
        },
    )
    distribute_module(model.norm, mesh)
    if tie:
        # Both Shard(0) over the vocabulary: the tied weight is one DTensor Parameter of two
        # modules (as Hugging Face re-ties after tensor parallelism).
        model.head.weight = model.embed.weight
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return torch.randint(0, VOCAB, (2, 5), generator=gen), torch.randint(
        0, VOCAB, (10,), generator=gen
    )


def _loss(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits.full_tensor().flatten(0, 1), target)


def _optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def _train_parity(stock: nn.Module, fast: nn.Module, kind: str, steps: int) -> None:
    """``steps`` of (zero_grad, loss, backward, clip, step) on both: the same losses, gradient
    norms, gradients and parameters, bitwise; the accelerated parameters stay FastDTensor
    Parameters."""
    ids, target = _data()
    opts = [_optimizer(m, kind) for m in (stock, fast)]
    for step in range(steps):
        results = []
        for model, opt in zip((stock, fast), opts, strict=True):
            opt.zero_grad()
            loss = _loss(model, ids, target)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            grads = [p.grad for p in model.parameters()]
            opt.step()
            results.append((loss, norm, grads))
        (ls, ns, gs), (lf, nf, gf) = results
        assert torch.equal(ls, lf), (step, ls, lf)
        assert torch.equal(ns.full_tensor(), nf.full_tensor()), step
        for g, h in zip(gs, gf, strict=True):
            same(h, g, f"step {step} gradient")
    for (name, p), (_, q) in zip(stock.named_parameters(), fast.named_parameters(), strict=True):
        assert isinstance(q, FastDTensor) and isinstance(q, nn.Parameter), name
        same(q, p, name)


# --- modules built on the meta device -----------------------------------------------------------


def _on_meta(*, accelerate: str, tie: bool = False) -> LM:
    """torchtitan's order: build on meta, parallelize, (accelerate,) ``to_empty``, init weights
    (seeded), (accelerate)."""
    with torch.device("meta"):
        model = LM()
    _parallelize(model, tie=tie)
    if accelerate == "on meta":
        dtdispatch.accelerate(model)
        assert all(isinstance(p, FastDTensor) for p in model.parameters())
        assert all(p.to_local().device.type == "meta" for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(5)
    with torch.no_grad():
        model.init_weights()
    if accelerate == "after init":
        dtdispatch.accelerate(model)
    return model


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_meta_device_accelerate_then_materialize(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    with variant(impl, above):
        for kind in ("sgd", "adamw"):
            for when in ("on meta", "after init"):
                stock = _on_meta(accelerate="never")
                fast = _on_meta(accelerate=when)
                for (name, p), (_, q) in zip(
                    stock.named_parameters(), fast.named_parameters(), strict=True
                ):
                    assert type(p) is DTensor and isinstance(q, FastDTensor), (when, name)
                    assert isinstance(q, nn.Parameter) and q.is_leaf and q.requires_grad, name
                    assert q.to_local().device.type == "cpu", name
                    same(q, p, f"{when} {name}")
                _train_parity(stock, fast, kind, steps=3)


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_meta_device_tied_weights(rank: int, world_size: int, impl: str, above: bool) -> None:
    with variant(impl, above):
        stock = _on_meta(accelerate="never", tie=True)
        fast = _on_meta(accelerate="on meta", tie=True)
        assert fast.head.weight is fast.embed.weight and stock.head.weight is stock.embed.weight
        _train_parity(stock, fast, "adamw", steps=3)


# --- tied parameters ----------------------------------------------------------------------------


def _tied(*, accelerate: bool) -> LM:
    torch.manual_seed(0)
    model = _parallelize(LM(), tie=True)
    if accelerate:
        dtdispatch.accelerate(model)
    return model


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_tied_embedding_and_head_stay_one_parameter(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    with variant(impl, above):
        stock, fast = _tied(accelerate=False), _tied(accelerate=True)
        assert fast.head.weight is fast.embed.weight
        assert [n for n, _ in fast.named_parameters()] == [n for n, _ in stock.named_parameters()]
        assert len(list(fast.parameters())) == len(list(stock.parameters()))
        assert list(fast.state_dict()) == list(stock.state_dict())
        # The tied gradient is the sum of both modules' contributions, as stock's.
        ids, target = _data()
        for model in (stock, fast):
            _loss(model, ids, target).backward()
        assert isinstance(fast.embed.weight.grad, FastDTensor)
        same(fast.embed.weight.grad, stock.embed.weight.grad)
        for model in (stock, fast):
            model.zero_grad()
        for kind in ("adamw", "sgd"):
            _train_parity(stock, fast, kind, steps=4)
        # And back: still one parameter, still training as stock.
        dtdispatch.to_torch(fast)
        assert fast.head.weight is fast.embed.weight and type(fast.head.weight) is DTensor
        dtdispatch.accelerate(fast)
        _train_parity(stock, fast, "sgd", steps=2)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.norm(self.embed(ids)))
        return out


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2, timeout=120)
def test_fsdp2_tied_weights_and_get_state_dict(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    with variant(impl, above):
        models, opts = [], []
        for accelerate in (False, True):
            torch.manual_seed(0)
            model = _Tied()
            fully_shard(model, mesh=mesh_1d())
            if accelerate:
                dtdispatch.accelerate(model)
            models.append(model)
            opts.append(torch.optim.AdamW(model.parameters(), lr=0.05))
        stock, fast = models
        assert fast.head.weight is fast.embed.weight
        gen = torch.Generator().manual_seed(21 + rank)  # each rank its own batch (data parallel)
        ids, target = (
            torch.randint(0, VOCAB, (2, 5), generator=gen),
            torch.randint(0, VOCAB, (10,), generator=gen),
        )
        for _ in range(3):
            losses = []
            for model, opt in zip(models, opts, strict=True):
                opt.zero_grad()
                loss = F.cross_entropy(model(ids).flatten(0, 1), target)
                loss.backward()
                opt.step()
                losses.append(loss)
            assert torch.equal(losses[0], losses[1])
        for p, q in zip(stock.parameters(), fast.parameters(), strict=True):
            same(q, p)
        (model_s, optim_s), (model_f, optim_f) = (
            get_state_dict(m, o) for m, o in zip(models, opts, strict=True)
        )
        assert list(model_f) == list(model_s)
        for key, value in model_s.items():
            same(model_f[key], value, key)
        assert optim_f["state"].keys() == optim_s["state"].keys()
        for key, state in optim_s["state"].items():
            for name, value in state.items():
                same(optim_f["state"][key][name], value, f"{key} {name}")


# --- to_torch / accelerate with a live optimizer ------------------------------------------------


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_to_torch_and_accelerate_keep_a_live_optimizer(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    """An optimizer made before ``to_torch`` (or before ``accelerate``) keeps training the model:
    the same losses and parameters as stock at every step."""
    with variant(impl, above):
        config = TrainConfig(optimizer="adamw", foreach=True, loss="replicate")
        stock = Trainer(mesh_1d(), config, accelerate=False)
        fast = Trainer(mesh_1d(), config, accelerate=True)
        late = Trainer(mesh_1d(), config, accelerate=False)  # accelerated after its optimizer
        params = [id(p) for p in fast.model.parameters()]
        hooked = next(iter(fast.model.parameters()))
        calls: list[type] = []
        hooked.register_post_accumulate_grad_hook(lambda p: calls.append(type(p)))
        for step in range(6):
            if step == 2:
                dtdispatch.to_torch(fast.model)
                dtdispatch.accelerate(late.model)
                assert [id(p) for p in fast.model.parameters()] == params
                # The roles (ARCHITECTURE "Two roles: replay and autograd"): a parameter that
                # requires grad and its gradient are in the autograd role.
                for model, kind, grad_kind in (
                    (fast.model, DTensor, DTensor),
                    (late.model, AutogradFastDTensor, AutogradFastDTensor),
                ):
                    for p in model.parameters():
                        assert type(p) is kind and isinstance(p, nn.Parameter) and p.is_leaf
                        assert p.grad is None or type(p.grad) is grad_kind
            if step == 4:
                dtdispatch.accelerate(fast.model)
            expected = stock.step()
            assert torch.equal(fast.step(), expected), step
            assert torch.equal(late.step(), expected), step
        assert calls == [AutogradFastDTensor] * 2 + [DTensor] * 2 + [AutogradFastDTensor] * 2
        for trainer in (fast, late):
            for p, q in zip(stock.model.parameters(), trainer.model.parameters(), strict=True):
                same(q, p)


# --- pickling -----------------------------------------------------------------------------------


def _round_trips() -> dict[str, Callable[[Any], Any]]:
    def torch_load(obj: Any, weights_only: bool = True) -> Any:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=weights_only)

    return {
        "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
        "torch.save": torch_load,
        "torch.save full": lambda obj: torch_load(obj, weights_only=False),
        "deepcopy": copy.deepcopy,
    }


def _describe(t: Any) -> tuple[Any, ...]:
    """What is compared of an unpickled tensor (its type aside)."""
    return (
        isinstance(t, nn.Parameter),
        t.requires_grad,
        t.is_leaf,
        dict(t.__dict__),
        t.placements,
        t.to_local().dtype,
        t.to_local().shape,
        t.to_local().stride(),
    )


def _check_loaded(fast: Any, stock: Any, what: str) -> None:
    assert type(stock) is DTensor and isinstance(fast, FastDTensor), (what, type(fast))
    assert _describe(fast) == _describe(stock), (what, _describe(fast), _describe(stock))
    same(fast, stock, what)


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_pickled_parameters_stay_parameters(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    with variant(impl, above):
        models = []
        for accelerate in (False, True):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.LayerNorm(HIDDEN))
            # distribute_module without input/output functions: no hooks, so the module pickles.
            distribute_module(model, mesh_1d(), _shard_first_weight)
            model[0].weight.tag = "user attribute"  # instance state is pickled as stock's
            if accelerate:
                dtdispatch.accelerate(model)
            models.append(model)
        stock, fast = models
        assert isinstance(fast[0].weight, FastDTensor)
        for how, trip in _round_trips().items():
            _check_loaded(trip(fast[0].weight), trip(stock[0].weight), f"{how} parameter")
            params_f, params_s = trip(list(fast.parameters())), trip(list(stock.parameters()))
            for f, s in zip(params_f, params_s, strict=True):
                _check_loaded(f, s, f"{how} parameter list")
            for keep_vars in (False, True):
                sd_f = trip(fast.state_dict(keep_vars=keep_vars))
                sd_s = trip(stock.state_dict(keep_vars=keep_vars))
                assert list(sd_f) == list(sd_s)
                for key in sd_s:
                    _check_loaded(sd_f[key], sd_s[key], f"{how} state_dict({keep_vars}) {key}")
            if how != "torch.save":  # a whole module is not a weights-only object
                loaded_f, loaded_s = trip(fast), trip(stock)
                for (name, f), (_, s) in zip(
                    loaded_f.named_parameters(), loaded_s.named_parameters(), strict=True
                ):
                    _check_loaded(f, s, f"{how} module {name}")
                # The loaded module trains as the loaded stock one.
                x = torch.randn(3, DIM, generator=torch.Generator().manual_seed(4))
                for m in (loaded_f, loaded_s):
                    m(_distribute(x, mesh_1d(), shard=False)).sum().backward()
                for f, s in zip(loaded_f.parameters(), loaded_s.parameters(), strict=True):
                    same(f.grad, s.grad)
        # Hooks are not pickled; stock warns about them, and so does dtdispatch.
        for model in (stock, fast):
            model[0].weight.register_hook(lambda g: g)
        caught = []
        for model in (stock, fast):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                pickle.dumps(model[0].weight)
            caught.append(sorted({str(w.category) for w in seen}))
        assert caught[0] == caught[1] and caught[0]


def _distribute(t: torch.Tensor, mesh: Any, *, shard: bool) -> DTensor:
    return distribute_tensor(t, mesh, [Shard(0)] if shard else [Replicate()])


def _shard_first_weight(name: str, module: nn.Module, mesh: Any) -> None:
    """A ``distribute_module`` partition function: the first layer's weight Shard(0), every other
    parameter replicated."""
    for key, param in list(module.named_parameters(recurse=False)):
        shard = name == "0" and key == "weight"
        module.register_parameter(key, nn.Parameter(_distribute(param, mesh, shard=shard)))
