"""Whole steps: local tensors vs stock DTensor vs dtdispatch on two tensor-parallel models, and the
DTensor API calls each alone.

    python benchmarks/step.py                  # world sizes 1 and 2 via torchrun; writes results
    python benchmarks/step.py --world-sizes 1 --rounds 9

Models: ``throughput`` (``launch/throughput.py``'s: ``dtdispatch.testing.training``'s block + head
under ColwiseParallel / RowwiseParallel / PrepareModuleInput / PrepareModuleOutput) and ``llama``
(a llama-style block written as a new user would: RMSNorm under SequenceParallel, attention and a
SwiGLU MLP under PrepareModuleInput + ColwiseParallel / RowwiseParallel, a final norm and head).
Workloads: the forward under ``torch.no_grad()`` and a training step (zero_grad, forward, loss,
backward, ``clip_grad_norm_`` foreach, AdamW foreach). "local" is the same module, not
parallelized, on plain tensors (on every rank the whole model: a reference for the work, not a
parallel run). Same process, same weights and inputs, variants interleaved in rotating order in
every round; reported: the median over rounds of a round's mean time per call.

Then dtdispatch's telemetry per call (``dtdispatch.stats()``: what each path did, with the defaults
and with the path above dispatch off), and ``--profile``: cProfile of each workload on dtdispatch
and stock (world size 1 only), its time grouped into categories (where the rest of the time goes).
Outputs (``--out``, default benchmarks/results): step.json, step.md and, with matplotlib (the
``plot`` extra), step.png.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("local", "stock", "dtdispatch")
ABOVE_OFF = "dtdispatch, above off"
"""The dtdispatch model again with the path above dispatch off (``DTDISPATCH_ABOVE=0``), timed in
the same rounds: the default must never be slower."""
TORCH_COLLECTIVES = "dtdispatch, torch's collectives"
"""At world size 2 and more: the dtdispatch model again with its redistributions through torch's
functional collectives (``DTDISPATCH_DIRECT_COLLECTIVES=0``), timed in the same rounds."""
MODELS = ("throughput", "llama")
FLOOR_BELOW = 0.61
"""A minimal Python ``__torch_dispatch__`` with autograd, as a share of stock's op (README, "The
floor below dispatch"): the bound on a step's ratio outside its collectives."""
WORKLOADS = ("no_grad forward", "training step")


def _llama(dim: int = 64, heads: int = 4, hidden: int = 128) -> Any:
    import torch
    import torch.nn.functional as F
    from _llama import FeedForward, RMSNorm
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head_dim = dim // heads
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in "qkvo")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            q, k, v = (
                w(x).view(b, s, -1, self.head_dim).transpose(1, 2)
                for w in (self.wq, self.wk, self.wv)
            )
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.wo(out.transpose(1, 2).reshape(b, s, -1))

    class Llama(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_norm = RMSNorm(dim)
            self.attention = Attention()
            self.ffn_norm = RMSNorm(dim)
            self.feed_forward = FeedForward(dim, hidden)
            self.norm = RMSNorm(dim)
            self.output = nn.Linear(dim, dim, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x + self.attention(self.attention_norm(x))
            h = h + self.feed_forward(self.ffn_norm(h))
            return self.output(self.norm(h))

    return Llama()


def _llama_plan() -> dict[str, Any]:
    """torchtitan's plan for a block, with sequence parallel norms."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }


class _Run:
    """One model in one variant: ``forward()`` under no_grad and ``step()`` (a training step)."""

    def __init__(self, model: Any, inputs: Any, target: Any, loss: Callable[..., Any]) -> None:
        import torch

        self.model, self.inputs, self.target, self.loss_fn = model, inputs, target, loss
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

    def forward(self) -> None:
        import torch

        with torch.no_grad():
            self.model(self.inputs)

    def step(self) -> None:
        import torch

        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(self.inputs), self.target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1.0, foreach=True)
        self.optimizer.step()


def _runs(model_name: str, mesh: Any) -> dict[str, _Run]:
    import torch
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    import dtdispatch
    from dtdispatch.testing import training

    runs: dict[str, _Run] = {}
    tp = mesh.size()
    rank = mesh.get_local_rank()
    device = training.mesh_device(mesh)
    gen = torch.Generator().manual_seed(1000)
    if model_name == "throughput":
        shape = (training.BATCH, training.SEQ, training.DIM)
        inputs, target = (torch.randn(shape, generator=gen).to(device) for _ in "it")
        config = training.TrainConfig(optimizer="adamw", foreach=True)
        torch.manual_seed(config.seed)
        local = training.Model().to(device)
        runs["local"] = _Run(local, inputs, target, lambda out, t: (out - t).square().mean())
        target_dt = distribute_tensor(target, mesh, [Replicate()])
        for name in ("stock", "dtdispatch"):
            model = training.build_model(mesh, config, accelerate=name == "dtdispatch")
            runs[name] = _Run(model, inputs, target_dt, lambda out, t: (out - t).square().mean())
        return runs
    shape = (4, 16, 64)
    inputs, target = (torch.randn(shape, generator=gen).to(device) for _ in "it")
    torch.manual_seed(0)
    runs["local"] = _Run(
        _llama().to(device), inputs, target, lambda out, t: (out - t).square().mean()
    )
    # torchtitan's layout: the residual stream is each rank's local sequence shard (plain
    # tensors); SequenceParallel / PrepareModuleInput make DTensors of it inside each module.
    shard = inputs.chunk(tp, dim=1)[rank].contiguous()
    for name in ("stock", "dtdispatch"):
        torch.manual_seed(0)
        model = _llama().to(device)
        parallelize_module(model, mesh, _llama_plan())
        if name == "dtdispatch":
            dtdispatch.accelerate(model)
        runs[name] = _Run(model, shard, target, lambda out, t: (out - t).square().mean())
    return runs


def _interleaved(
    fns: dict[str, Callable[[], None]],
    rounds: int,
    calls: int,
    barrier: Callable[[], None],
    setup: dict[str, Callable[[], None]] | None = None,
    cpu: dict[str, float] | None = None,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median over rounds of the mean ms per call; the order rotates every round. ``setup[name]``
    runs untimed before each of that variant's batches; ``cpu``, when given, receives the median
    process CPU ms per call (all threads: the gloo workers' too), which a wait does not count;
    ``sync`` runs inside the timed batch after its calls (``torch.cuda.synchronize`` on a GPU, so
    that the clock stops when the device's work is done, not when it was queued)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu_times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if setup is not None and name in setup:
                setup[name]()
            barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fns[name]()
            sync()
            cpu_times[name].append((time.process_time() - cpu_start) / calls * 1e3)
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    if cpu is not None:
        cpu.update({n: statistics.median(t) for n, t in cpu_times.items()})
    return {n: statistics.median(t) for n, t in times.items()}


def _api_cases(mesh: Any) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """(stock call, dtdispatch call) for each DTensor API call on its own; the last four
    communicate at world size 2 (at world size 1 nothing moves)."""
    import torch
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import dtdispatch
    from dtdispatch import FastDTensor
    from dtdispatch.testing import training

    device = training.mesh_device(mesh)
    value = torch.randn(8, 16, device=device)
    sharded = distribute_tensor(value, mesh, [Shard(1)])
    replicated = distribute_tensor(value, mesh, [Replicate()])
    leaf = sharded.detach().requires_grad_()
    # sequence-parallel activations: (batch, sequence, hidden), the sequence sharded or partial
    activation = torch.randn(2, 8 * mesh.size(), 16, device=device)
    seq = distribute_tensor(activation, mesh, [Shard(1)])
    partial = DTensor.from_local(activation, mesh, [Partial()])
    pairs = {
        "sharded": (sharded, dtdispatch.accelerate(sharded)),
        "replicated": (replicated, dtdispatch.accelerate(replicated)),
        "leaf": (leaf, dtdispatch.accelerate(leaf.detach()).requires_grad_()),
        "seq": (seq, dtdispatch.accelerate(seq.detach())),
        "partial": (partial, dtdispatch.accelerate(partial.detach())),
    }
    local = torch.randn(8, 16, device=device)
    local_grad = local.clone().requires_grad_()
    same = (Shard(-1),)  # what ColwiseParallel's output hook asks for: no change
    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    for i, name in enumerate(("stock", "dtdispatch")):
        stock = name == "stock"
        sh, rep, lf, sq, pa = (
            pairs[k][i] for k in ("sharded", "replicated", "leaf", "seq", "partial")
        )
        from_local = DTensor.from_local if stock else FastDTensor.from_local
        calls = {
            "redistribute, same placements": lambda sh=sh: sh.redistribute(placements=same),
            "redistribute, same placements, needs grad": lambda lf=lf: lf.redistribute(
                placements=same
            ),
            "redistribute Replicate -> Shard (local chunk)": lambda rep=rep: rep.redistribute(
                placements=[Shard(0)]
            ),
            "from_local": lambda fl=from_local: fl(local, mesh, same),
            "from_local, needs grad": lambda fl=from_local: fl(local_grad, mesh, same),
            "to_local": lambda sh=sh: sh.to_local(),
            "to_local, needs grad": lambda lf=lf: lf.to_local(),
            "full_tensor of a Replicate": lambda rep=rep: rep.full_tensor(),
            "redistribute Shard(1) -> Replicate (all-gather)": lambda sq=sq: sq.redistribute(
                placements=[Replicate()]
            ),
            "redistribute Partial -> Shard(1) (reduce-scatter)": lambda pa=pa: pa.redistribute(
                placements=[Shard(1)]
            ),
            "redistribute Partial -> Replicate (all-reduce)": lambda pa=pa: pa.redistribute(
                placements=[Replicate()]
            ),
            "full_tensor of a Shard(1)": lambda sq=sq: sq.full_tensor(),
        }
        for case, fn in calls.items():
            cases.setdefault(case, (fn, fn))
            cases[case] = (fn, cases[case][1]) if stock else (cases[case][0], fn)
    return cases


_CATEGORIES = (
    ("backward engine (C++: backward kernels, dispatch)", ("run_backward",)),
    ("dtdispatch API calls and hooks", ("dtdispatch/_tensor.py", "dtdispatch/_training.py")),
    ("dtdispatch dispatch, Python", ("dtdispatch/",)),
    ("torch DTensor Python (redistribute, sharding, from_local ...)", ("torch/distributed/",)),
    ("autograd Function machinery", ("torch/autograd/",)),
    ("optimizer and clipping Python", ("torch/optim/", "torch/nn/utils/")),
    ("nn.Module call machinery", ("torch/nn/modules/module.py",)),
    ("model code (forward functions)", ("benchmarks/step.py", "dtdispatch/testing/")),
    (
        "torch ops from Python (C++: kernels, dispatch, native dtdispatch)",
        ("<built-in method", "<method "),
    ),
)


def _own_time(
    stats: pstats.Stats,
    categories: tuple[tuple[str, tuple[str, ...]], ...] = _CATEGORIES,
    other: str = "other Python and builtins",
) -> dict[str, float]:
    """Own time (s) of the profiled functions by category, each function in the first category
    with a substring of its "path function"; largest first."""
    seconds: dict[str, float] = {}
    for (path, _line, func), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{path} {func}"
        category = next((n for n, needles in categories if any(x in where for x in needles)), other)
        seconds[category] = seconds.get(category, 0.0) + tottime
    return dict(sorted(seconds.items(), key=lambda kv: -kv[1]))


def _profile(fn: Callable[[], None], calls: int) -> dict[str, float]:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    return {k: v / total for k, v in _own_time(stats).items()}


def _collectives_alone(step: Callable[[], None], barrier: Callable[[], None], rounds: int) -> Any:
    """(count, ms): the functional collectives one call of ``step`` issues (recorded under a
    dispatch mode, with their input shapes), then the same collectives alone, back to back on fresh
    plain tensors with a ``wait_tensor`` each, median ms over ``rounds``: the part of a step that
    no dispatch cost can remove."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    funcol = torch.ops._c10d_functional
    kinds = (funcol.all_gather_into_tensor, funcol.reduce_scatter_tensor, funcol.all_reduce)
    calls: list[tuple[Any, torch.Size, torch.dtype, tuple[Any, ...]]] = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            if DTensor in types:
                return NotImplemented  # as CommDebugMode: DTensor desugars into collectives first
            if func.overloadpacket in kinds:
                calls.append((func, args[0].shape, args[0].dtype, args[1:]))
            return func(*args, **(kwargs or {}))

    with _Record():
        step()
    buffers = [(func, torch.randn(shape).to(dtype), rest) for func, shape, dtype, rest in calls]

    def alone() -> None:
        for func, buffer, rest in buffers:
            funcol.wait_tensor(func(buffer, *rest))

    for _ in range(3):
        alone()
    times = []
    for _ in range(rounds):
        barrier()
        start = time.perf_counter()
        alone()
        times.append((time.perf_counter() - start) * 1e3)
    return len(buffers), statistics.median(times)


def _work(fn: Callable[[], None], calls: int = 4) -> dict[str, float]:
    """dtdispatch's telemetry for one call of ``fn`` (the mean of ``calls``, plans already made):
    what the dispatch path and the path above dispatch each did."""
    import dtdispatch

    dtdispatch.reset_stats()
    for _ in range(calls):
        fn()
    s = dtdispatch.stats()
    above = s["above"]
    counts = {
        "hits": s["hits"],
        "misses": s["misses"],
        "bailouts": sum(n for reason, n in s["bailouts"].items() if reason != "miss"),
        "above hits": above["hits"],
        "above misses": above["misses"],
        "above refused": sum(above["negative"].values()),
        "above stepped aside": sum(above["stepped_aside"].values()),
    }
    return {k: v / calls for k, v in counts.items()}


def _worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "launch"))
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist
    from _bootstrap import init_distributed
    from torch.distributed.device_mesh import init_device_mesh

    info = init_distributed()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    barrier = dist.barrier if info.world_size > 1 else (lambda: None)
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    result: dict[str, Any] = {
        "world_size": info.world_size,
        "backend": info.backend,
        "device": str(info.device),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "steps": {},
        "api": {},
        "profile": {},
    }
    from dtdispatch import _collectives, _dispatcher, _native

    def configure(name: str) -> None:
        _dispatcher.install(_native.DEFAULT, above=name != ABOVE_OFF)
        _collectives.ENABLED = name != TORCH_COLLECTIVES

    extra = (ABOVE_OFF, TORCH_COLLECTIVES) if info.world_size > 1 else (ABOVE_OFF,)
    setup = {name: (lambda name=name: configure(name)) for name in (*VARIANTS, *extra)}
    result["cpu"] = {}
    for model_name in MODELS:
        runs = _runs(model_name, mesh)
        for run in runs.values():  # warm-up: plans cached, optimizer state created
            for _ in range(3):
                run.step()
                run.forward()
        for workload in WORKLOADS:
            fns = {
                v: (runs[v].forward if workload == WORKLOADS[0] else runs[v].step) for v in VARIANTS
            }
            for name in extra:
                fns[name] = fns["dtdispatch"]
            calls = args.calls if workload == WORKLOADS[0] else max(1, args.calls // 4)
            cpu: dict[str, float] = {}
            ms = _interleaved(fns, args.rounds, calls, barrier, setup, cpu, sync)
            result["steps"][f"{model_name}: {workload}"] = ms
            if info.world_size > 1:
                count, alone = _collectives_alone(fns["stock"], barrier, args.rounds)
                result.setdefault("collectives", {})[f"{model_name}: {workload}"] = {
                    "count": count,
                    "ms": alone,
                }
            result["cpu"][f"{model_name}: {workload}"] = cpu
            work = result.setdefault("work", {})[f"{model_name}: {workload}"] = {}
            for name in ("dtdispatch", ABOVE_OFF):
                configure(name)
                work[name] = _work(fns[name])
            configure("dtdispatch")  # the profile below times the defaults
            if args.profile and info.world_size == 1:
                result["profile"][f"{model_name}: {workload}"] = {
                    v: _profile(fns[v], calls * 3) for v in ("stock", "dtdispatch")
                }
    configure("dtdispatch")  # the defaults again (the last round may have been another variant)
    for case, (stock, fast) in _api_cases(mesh).items():
        us = _interleaved(
            {"stock": stock, "dtdispatch": fast}, args.rounds, 200, lambda: None, sync=sync
        )
        result["api"][case] = {k: v * 1e3 for k, v in us.items()}
    if info.rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_ws{info.world_size}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


def _table(results: list[dict[str, Any]]) -> str:
    lines = []
    for res in results:
        lines += [
            f"World size {res['world_size']} ({res['backend']}, {res.get('device', 'cpu')}, "
            f"torch {res['torch']}), ms, "
            f"median of {res['rounds']} interleaved rounds:",
            "",
            "| workload | local | stock | dtdispatch | dtdispatch/stock | dtdispatch/local "
            "| above off/stock |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, ms in res["steps"].items():
            lines.append(
                f"| {name} | {ms['local']:.3f} | {ms['stock']:.3f} | {ms['dtdispatch']:.3f} | "
                f"{ms['dtdispatch'] / ms['stock']:.2f} | {ms['dtdispatch'] / ms['local']:.1f} | "
                f"{ms[ABOVE_OFF] / ms['stock']:.2f} |"
            )
        if res.get("collectives"):
            lines += [
                "",
                f"Collectives alone (world size {res['world_size']}): the functional collectives "
                "one stock call issues, back to back on plain tensors; the bound is what the "
                f"ratio would be with dtdispatch at {FLOOR_BELOW} of stock outside them "
                '(README, "The floor below dispatch"):',
                "",
                "| workload | collectives | alone, ms | stock, ms | dtdispatch/stock | bound |",
                "|---|---|---|---|---|---|",
            ]
            for name, c in res["collectives"].items():
                ms = res["steps"][name]
                bound = (c["ms"] + FLOOR_BELOW * max(ms["stock"] - c["ms"], 0.0)) / ms["stock"]
                lines.append(
                    f"| {name} | {c['count']} | {c['ms']:.2f} | {ms['stock']:.2f} | "
                    f"{ms['dtdispatch'] / ms['stock']:.2f} | {bound:.2f} |"
                )
        if any(TORCH_COLLECTIVES in ms for ms in res["steps"].values()):
            lines += [
                "",
                f"Direct collectives (world size {res['world_size']}): dtdispatch with its "
                "redistributions' collectives called on the process group (default) and through "
                "torch's functional collectives, ms per call, wall and process CPU:",
                "",
                "| workload | default: wall | CPU | torch's collectives: wall | CPU |",
                "|---|---|---|---|---|",
            ]
            for name, ms in res["steps"].items():
                cpu = res["cpu"][name]
                lines.append(
                    f"| {name} | {ms['dtdispatch']:.3f} | {cpu['dtdispatch']:.3f} | "
                    f"{ms[TORCH_COLLECTIVES]:.3f} | {cpu[TORCH_COLLECTIVES]:.3f} |"
                )
        if res.get("work"):
            lines += [
                "",
                f"Work per call (world size {res['world_size']}, `dtdispatch.stats()`): the "
                "dispatch path's plan hits, misses and other calls it handed to Python "
                "(bailouts), the path above dispatch's replays, plans, refusals and calls it "
                "stepped aside from, with the defaults and with the path above dispatch off:",
                "",
                "| workload | variant | hits | misses | bailouts | above: hits | misses | refused "
                "| stepped aside |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for name, variants in res["work"].items():
                for variant, w in variants.items():
                    label = "default" if variant == "dtdispatch" else "above off"
                    lines.append(
                        f"| {name} | {label} | {w['hits']:g} | {w['misses']:g} | "
                        f"{w['bailouts']:g} | {w['above hits']:g} | {w['above misses']:g} | "
                        f"{w['above refused']:g} | {w['above stepped aside']:g} |"
                    )
        lines += [
            "",
            f"DTensor API calls alone (world size {res['world_size']}), µs:",
            "",
            "| call | stock | dtdispatch | dtdispatch/stock |",
            "|---|---|---|---|",
        ]
        for case, us in res["api"].items():
            lines.append(
                f"| {case} | {us['stock']:.2f} | {us['dtdispatch']:.2f} | "
                f"{us['dtdispatch'] / us['stock']:.2f} |"
            )
        lines.append("")
        for name, variants in res["profile"].items():
            lines += [
                f"Where the time goes (cProfile, own time, world size {res['world_size']}): {name}",
                "",
                "| category | stock | dtdispatch |",
                "|---|---|---|",
            ]
            categories = list(variants["dtdispatch"])
            categories += [c for c in variants["stock"] if c not in categories]
            for c in categories:
                lines.append(
                    f"| {c} | {variants['stock'].get(c, 0.0):.0%} | "
                    f"{variants['dtdispatch'].get(c, 0.0):.0%} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def _plot(results: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        names = list(res["steps"])
        width = 0.27
        for i, v in enumerate(VARIANTS):
            vals = [res["steps"][n][v] for n in names]
            ax.bar([x + (i - 1) * width for x in range(len(names))], vals, width, label=v)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("ms (median)")
        ax.set_yscale("log")
        ax.set_title(f"world size {res['world_size']} ({res['backend']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median)")
    parser.add_argument(
        "--calls", type=int, default=40, help="forwards per timed batch (a quarter as many steps)"
    )
    parser.add_argument(
        "--no-profile", dest="profile", action="store_false", help="skip the cProfile breakdown"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    out = Path(args.out)
    results = []
    for n in args.world_sizes:
        print(f"world size {n}: starting {n} rank(s) under torchrun", file=sys.stderr, flush=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            __file__,
            "--worker",
            "--rounds",
            str(args.rounds),
            "--calls",
            str(args.calls),
            "--out",
            args.out,
        ]
        if not args.profile:
            cmd.append("--no-profile")
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results.append(json.loads((out / f"step_ws{n}.json").read_text()))
    (out / "step.json").write_text(json.dumps(results, indent=1))
    table = _table(results)
    (out / "step.md").write_text(table)
    plotted = _plot(results, out / "step.png")
    print(table)
    print(
        f"wrote {out}/step.{{json,md}}" + (" and .png" if plotted else " (no matplotlib: no plot)")
    )


if __name__ == "__main__":
    main()
