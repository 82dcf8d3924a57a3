"""A small tensor-parallel training workload, run on stock DTensor and on dtdispatch, bitwise.

Used by ``tests/distributed/test_training*.py``, ``launch/correctness.py`` and
``benchmarks/memory_growth.py``. The model is a transformer-style block (layer norms, attention
projections, an MLP, residuals) plus a linear head, parallelized with torch's own parallel styles.
Every rank builds the same initial weights from a seed; on a 2-D ("dp", "tp") mesh the block is
tensor parallel on "tp" and replicated on "dp" (each dp replica sees its own batch and gradients are
averaged over "dp", as DDP does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

import dtdispatch

__all__ = [
    "MIN_COVERAGE",
    "OPTIMIZERS",
    "PARITY_CONFIGS",
    "Block",
    "Model",
    "ParityReport",
    "TrainConfig",
    "Trainer",
    "build_model",
    "check",
    "compare_models",
    "mesh_device",
    "run_training_parity",
    "train_parity",
]

DIM = 16
HEADS = 4
HIDDEN = 32
BATCH = 2
SEQ = 4

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("replicate", "partial", "local")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Written for tensor parallelism the usual way (torchtitan style): the residual stream and the MLP
    are DTensors; q/k/v come out of their colwise projections as local shards
    (``use_local_output=True``), so the attention itself runs on each rank's own heads as plain
    tensors, and the rowwise output projection's hook turns its plain input back into a DTensor with
    ``DTensor.from_local``.
    """

    def __init__(self, dim: int = DIM, heads: int = HEADS, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.attn_norm = nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        heads: torch.Tensor = t.view(b, s, -1, self.head_dim).transpose(1, 2)
        return heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        q, k, v = self._heads(self.wq(h)), self._heads(self.wk(h)), self._heads(self.wv(h))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        b, _, s, _ = attn.shape
        x = x + self.wo(attn.transpose(1, 2).reshape(b, s, -1))
        out: torch.Tensor = x + self.w2(F.gelu(self.w1(self.mlp_norm(x))))
        return out


class Model(nn.Module):
    """A block and a linear head; the head's output layout (Replicate or Partial) is the loss's."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.block(x))
        return out


def _tp_plan(*, sequence_parallel: bool, head_output: Any) -> dict[str, Any]:
    """torch's parallel styles for ``Model`` on a 1-D tensor-parallel mesh."""
    act = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, Any] = {
        # q/k/v: local outputs (torch's default), attention on local heads.
        "block.wq": ColwiseParallel(input_layouts=act),
        "block.wk": ColwiseParallel(input_layouts=act),
        "block.wv": ColwiseParallel(input_layouts=act),
        # wo: its hook makes the plain attention output a DTensor again (from_local).
        "block.wo": RowwiseParallel(output_layouts=act, use_local_output=False),
        "block.w1": ColwiseParallel(input_layouts=act, use_local_output=False),
        "block.w2": RowwiseParallel(output_layouts=act, use_local_output=False),
        "head": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=head_output, use_local_output=False
        ),
    }
    if sequence_parallel:
        plan["block.attn_norm"] = SequenceParallel()
        plan["block.mlp_norm"] = SequenceParallel()
    return plan


@dataclass(frozen=True)
class TrainConfig:
    """One training run: optimizer, foreach, loss kind, sequence parallel, clip."""

    optimizer: str = "adamw"
    foreach: bool = True
    # "replicate", "partial" (a Partial loss) or "local" (the loss of to_local()'s plain tensor)
    loss: str = "replicate"
    sequence_parallel: bool = False
    clip: bool = True
    # keep an EMA of the weights with a warm-up decay (a lerp_ weight that changes every step)
    ema: bool = False
    seed: int = 0


def mesh_device(mesh: DeviceMesh) -> torch.device:
    """The mesh's device on this rank (the current CUDA device under nccl)."""
    return torch.empty(0, device=mesh.device_type).device


def build_model(mesh: DeviceMesh, config: TrainConfig, *, accelerate: bool) -> Model:
    """The parallelized model, tensor parallel on ``mesh`` (1-D) or on ``mesh["tp"]`` (2-D)."""
    tp_mesh = mesh["tp"] if mesh.ndim == 2 else mesh
    torch.manual_seed(config.seed)
    # NOTE: on the mesh's device before parallelizing: SequenceParallel wraps parameters with
    # from_local, which does not move them.
    model = Model().to(mesh_device(mesh))
    head_output = Partial() if config.loss == "partial" else Replicate()
    act = Shard(1) if config.sequence_parallel else Replicate()
    # The block's input: a plain local tensor (the sequence shard under sequence parallel) made a
    # DTensor by PrepareModuleInput; the block's output is laid out as the head wants it by
    # PrepareModuleOutput.
    parallelize_module(
        model.block,
        tp_mesh,
        PrepareModuleInput(
            input_layouts=(act,), desired_input_layouts=(act,), use_local_output=False
        ),
    )
    parallelize_module(
        model.block,
        tp_mesh,
        PrepareModuleOutput(
            output_layouts=(act,), desired_output_layouts=(Replicate(),), use_local_output=False
        ),
    )
    parallelize_module(
        model,
        tp_mesh,
        _tp_plan(sequence_parallel=config.sequence_parallel, head_output=head_output),
    )
    if not config.sequence_parallel:
        # Replicated layer norms: DTensor parameters, no hooks (their inputs already are DTensors).
        distribute_module(model.block.attn_norm, tp_mesh)
        distribute_module(model.block.mlp_norm, tp_mesh)
    if accelerate:
        dtdispatch.accelerate(model)
    return model


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, foreach=config.foreach)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=0.01, foreach=config.foreach)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, foreach=config.foreach)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; use one of {OPTIMIZERS}")


class Trainer:
    """A model, its optimizer, a per-step learning-rate schedule and fixed data.

    ``step()`` is one training step: zero_grad, forward, loss, backward, gradient averaging over
    "dp" (2-D), ``clip_grad_norm_``, ``optimizer.step()``, scheduler step, EMA update. It returns
    the loss as a plain full tensor. Stock and accelerated trainers of one config start identical.
    """

    def __init__(self, mesh: DeviceMesh, config: TrainConfig, *, accelerate: bool) -> None:
        self.config = config
        self.mesh = mesh
        self.tp_mesh = mesh["tp"] if mesh.ndim == 2 else mesh
        self.dp_group = mesh.get_group("dp") if mesh.ndim == 2 else None
        self.model = build_model(mesh, config, accelerate=accelerate)
        self.optimizer = _optimizer(self.model, config)
        # The learning rate changes every step: a step-varying scalar that must not grow any cache.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 1.0 / (1.0 + 0.1 * step)
        )
        dp_rank = mesh.get_coordinate()[0] if mesh.ndim == 2 else 0  # type: ignore[index]
        gen = torch.Generator().manual_seed(1000 + config.seed * 31 + dp_rank)
        device = mesh_device(mesh)
        self.inputs = torch.randn(BATCH, SEQ, DIM, generator=gen).to(device)
        target = torch.randn(BATCH, SEQ, DIM, generator=gen).to(device)
        self.target_local = target
        # A stock DTensor in both runs: stock data meeting dtdispatch activations is normal use.
        self.target = distribute_tensor(target, self.tp_mesh, [Replicate()])
        if config.sequence_parallel:
            tp_rank = self.tp_mesh.get_local_rank()
            self.inputs = self.inputs.chunk(self.tp_mesh.size(), dim=1)[tp_rank].contiguous()
        self.steps = 0
        with torch.no_grad():
            self.ema = [p.detach().clone() for p in self.model.parameters()] if config.ema else []

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        kind = self.config.loss
        if kind == "replicate":
            return (out - self.target).square().mean()
        if kind == "partial":
            # out is Partial: a loss linear in it stays Partial (no collective until it is read).
            return (out * self.target).mean()
        if kind == "local":
            return (cast(DTensor, out).to_local() - self.target_local).square().mean()
        raise ValueError(f"unknown loss kind {kind!r}; use one of {LOSSES}")

    def step(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        out = self.model(self.inputs)
        loss = self.loss(out)
        loss.backward()  # type: ignore[no-untyped-call]
        if self.dp_group is not None:
            self._average_over_dp()
        if self.config.clip:
            torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), max_norm=0.5, foreach=self.config.foreach
            )
        self.optimizer.step()
        self.scheduler.step()
        self.steps += 1
        with torch.no_grad():
            if self.ema:
                # A warm-up decay as timm/diffusers EMAs use: the lerp_ weight changes every step,
                # and torch keys lerp_'s scalar weight by value.
                decay = min(0.999, (1.0 + self.steps) / (10.0 + self.steps))
                for shadow, p in zip(self.ema, self.model.parameters(), strict=True):
                    shadow.lerp_(p, 1.0 - decay)
            value = loss.detach()
            return value.full_tensor() if isinstance(value, DTensor) else value

    def _average_over_dp(self) -> None:
        """DDP-style replication on "dp": each gradient's local shard is averaged over "dp"."""
        size = dist.get_world_size(self.dp_group)
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    local = cast(DTensor, p.grad).to_local()
                    dist.all_reduce(local, group=self.dp_group)
                    local.div_(size)


def compare_models(stock: Trainer, fast: Trainer) -> str:
    """Empty when every parameter and EMA shadow of ``fast`` is a FastDTensor bitwise equal to
    ``stock``'s plain DTensor (local shard, placements, global shape and stride); else why not."""
    named = zip(stock.model.named_parameters(), fast.model.named_parameters(), strict=True)
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = [(n, a, b) for (n, a), (_, b) in named]
    pairs += [(f"ema[{i}]", a, b) for i, (a, b) in enumerate(zip(stock.ema, fast.ema, strict=True))]
    for name, a, b in pairs:
        if type(a) is not DTensor or not isinstance(b, dtdispatch.FastDTensor):
            return (
                f"{name}: types {type(a).__name__}, {type(b).__name__} (want DTensor, FastDTensor)"
            )
        if a.placements != b.placements or a.shape != b.shape or a.stride() != b.stride():
            return f"{name}: layout {b.placements}/{b.shape} != stock {a.placements}/{a.shape}"
        if not torch.equal(a.to_local(), b.to_local()):
            diff = (a.to_local() - b.to_local()).abs().max().item()
            return f"{name}: values differ from stock (max abs diff {diff:.3g})"
    return ""


def _dp_replicas_agree(trainer: Trainer) -> str:
    """Empty when every parameter shard is identical on all "dp" replicas (2-D), else which not."""
    if trainer.dp_group is None:
        return ""
    size = dist.get_world_size(trainer.dp_group)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            local = cast(DTensor, p).to_local().contiguous()
            replicas = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(replicas, local, group=trainer.dp_group)
            if not all(torch.equal(r, local) for r in replicas):
                return f"{name}: the dp replicas differ"
    return ""


@dataclass
class ParityReport:
    """What ``train_parity`` saw: ``failure`` (empty on bitwise parity), the coverage of one step
    (and the ops that took torch's path in it), the plan-cache entry count after step 3 and after
    the last step, and stock's losses."""

    failure: str
    coverage: float
    stock_ops: dict[str, int]
    entries_step3: int
    entries_end: int
    losses: list[float]


def train_parity(
    mesh: DeviceMesh, config: TrainConfig, steps: int, *, coverage_step: int = 4
) -> ParityReport:
    """Train a stock and an accelerated model side by side for ``steps`` steps, comparing every loss
    and the final parameters bitwise. Step ``coverage_step`` of the accelerated model runs under
    ``dtdispatch.coverage`` (its loss is compared too)."""
    if not 3 <= coverage_step <= steps:
        raise ValueError(f"need 3 <= coverage_step <= steps, got {coverage_step} and {steps}")
    stock, fast = Trainer(mesh, config, accelerate=False), Trainer(mesh, config, accelerate=True)
    failure = ""
    fraction = math.nan
    stock_ops: dict[str, int] = {}
    entries_step3 = -1
    losses = []
    for i in range(1, steps + 1):
        expected = stock.step()
        if i == coverage_step:
            report = dtdispatch.coverage(fast.step, by_op=True)
            got, fraction = report["result"], report["fraction"]
            stock_ops = dict(report["stock_ops"])
        else:
            got = fast.step()
        if i == 3:
            entries_step3 = dtdispatch.stats()["entries"]
        losses.append(expected.item())
        if not failure and not torch.equal(expected, got):
            failure = f"step {i}: loss {got.item()!r} != stock {expected.item()!r}"
    failure = failure or compare_models(stock, fast) or _dp_replicas_agree(fast)
    return ParityReport(
        failure=f"{config}: {failure}" if failure else "",
        coverage=fraction,
        stock_ops=stock_ops,
        entries_step3=entries_step3,
        entries_end=dtdispatch.stats()["entries"],
        losses=losses,
    )


PARITY_CONFIGS: tuple[TrainConfig, ...] = (
    TrainConfig(optimizer="sgd", foreach=True, loss="replicate"),
    TrainConfig(optimizer="sgd", foreach=False, loss="partial"),
    TrainConfig(optimizer="adam", foreach=True, loss="local"),
    TrainConfig(optimizer="adam", foreach=False, loss="replicate"),
    TrainConfig(optimizer="adamw", foreach=True, loss="partial"),
    TrainConfig(optimizer="adamw", foreach=False, loss="local", ema=True),
)
"""Every optimizer with foreach on and off, the three loss kinds spread over them, clip_grad_norm_
in all, an EMA in one."""

MIN_COVERAGE = 0.95


def check(report: ParityReport) -> str:
    """Empty when the run was bitwise equal to stock, at least ``MIN_COVERAGE`` on dtdispatch, and
    its plan cache did not grow after step 3; else the first problem."""
    if report.failure:
        return report.failure
    if not report.coverage >= MIN_COVERAGE:
        return f"coverage {report.coverage:.1%} < {MIN_COVERAGE:.0%}; stock ops: {report.stock_ops}"
    if report.entries_end != report.entries_step3:
        return f"plan cache grew after step 3: {report.entries_step3} -> {report.entries_end}"
    return ""


def run_training_parity(
    mesh: DeviceMesh, *, steps: int, configs: tuple[TrainConfig, ...] = PARITY_CONFIGS
) -> str:
    """Every config trained on stock and on dtdispatch side by side (``train_parity``, ``check``):
    empty when all pass, else the first failure. The training rows of ``launch/correctness.py``."""
    for config in configs:
        failure = check(train_parity(mesh, config, steps, coverage_step=min(4, steps)))
        if failure:
            return failure
    return ""
