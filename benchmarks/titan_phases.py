"""torchtitan's Llama3 training step, phase by phase: its ``spmd_types`` backend against DTensor
(stock, ``dtdispatch.accelerate``, and that plus ``dtdispatch.reduce_partial_grads``).

    .clients/titan/bin/torchrun --standalone --nproc-per-node 2 benchmarks/titan_phases.py \\
        [--dims 64 256] [--rounds 20] [--warmup 3] [--seq 16] [--batch 2]

Run in the titan venv that ``make clients-venvs CLIENTS=titan`` builds (torchtitan 0.3.0 and
spmd_types, dtdispatch editable from this checkout). The model is torchtitan's Llama3 debug model
built as ``clients/titan.py`` builds it (2 layers, causal SDPA, a RoPE cache of ``--seq``), at each
width of ``--dims`` (256 is the debug model's own; the heads are ``dim // 16``), tensor parallel
over 2 gloo ranks with sequence parallel, trained with torchtitan's step: ``ChunkedLossWrapper``
loss, its ``clip_grad_norm_`` (max norm 1, foreach) and its fused AdamW. Variants, one process,
the same initial weights (copied from the DTensor model's local shards) and the same batches:

- ``spmd_types``: torchtitan's default backend (plain local tensors). Without FSDP it leaves the
  replicated norm weights' gradients partial and takes the gradient norm per rank, so the clip
  phase here adds what it needs to train the same model: one coalesced all-reduce of those
  gradients, and one all-reduce of the sharded gradients' squared norm.
- ``dtensor``: its ``partial_dtensor`` backend (DTensor parameters under its parallel styles).
- ``dtdispatch``: the same after ``dtdispatch.accelerate(model)``.
- ``dtdispatch+reduce``: that, plus ``dtdispatch.reduce_partial_grads(params)`` at the start of
  the clip phase (ARCHITECTURE "Reducing Partial gradients once").
- ``dtdispatch+reduce, torch's collectives``: the same with ``DTDISPATCH_DIRECT_COLLECTIVES=0``
  for its steps: redistributions through torch's functional collectives (ARCHITECTURE "The DTensor
  API calls").

Timing: a barrier before and after each phase (forward, loss, backward, clip, optimizer), the
time between them; variants interleaved in rotating order, one step each per round; reported: the
median over rounds per phase, the median of the step totals, and the median process CPU time of a
step on rank 0 (all its threads; a wait on the other rank costs none). Collectives per phase are
counted under ``CommDebugMode`` in one extra, untimed step per variant. The first ``--warmup``
steps are untimed and check the variants against ``dtensor``: ``dtdispatch`` bitwise, the others
within ``--tolerance`` (relative, on the loss, the gradient norm and every parameter); a failed
check exits 1. Output: a markdown table per width, ``--out`` (default
benchmarks/results/titan_phases.md), written by rank 0.

``--profile N``: then N more untimed steps per variant under cProfile on rank 0, their own time
per step grouped by where it is spent (collective waits, torchtitan's Python, torch's DTensor
Python, dtdispatch's Python, the autograd engine, ops called from Python ...): where the gap to
``spmd_types`` goes. cProfile slows Python-heavy code more than C++, so read shares, not times.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients"))

from titan import _parallel_dims, _patch_torchtitan  # noqa: E402

import dtdispatch  # noqa: E402
from dtdispatch import _collectives  # noqa: E402

PHASES = ("forward", "loss", "backward", "clip", "optimizer")
TORCH_COLLECTIVES = "dtdispatch+reduce, torch's collectives"
VARIANTS = ("spmd_types", "dtensor", "dtdispatch", "dtdispatch+reduce", TORCH_COLLECTIVES)
MAX_NORM = 1.0
LAYERS = 2


def _config(dim: int, seq: int) -> Any:
    """torchtitan's Llama3 debug model at width ``dim`` (its own is 256), 2 layers, causal SDPA,
    a RoPE cache of ``seq``, sharding configs for tensor and sequence parallel."""
    import torchtitan.models.llama3 as llama3
    from torchtitan.models.common import Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.rope import ComplexRoPE
    from torchtitan.models.llama3.sharding import set_llama3_sharding_config

    n_heads = dim // 16
    vocab = 2048
    cfg = llama3.Llama3Model.Config(
        dim=dim,
        vocab_size=vocab,
        tok_embeddings=Embedding.Config(
            num_embeddings=vocab, embedding_dim=dim, param_init=llama3._EMBEDDING_INIT
        ),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(
            in_features=dim, out_features=vocab, param_init=llama3._output_linear_init(dim)
        ),
        layers=llama3._build_llama3_layers(
            fuse_qkv=True,
            n_layers=LAYERS,
            dim=dim,
            n_heads=n_heads,
            hidden_dim=llama3.compute_ffn_hidden_dim(dim, multiple_of=256),
            rope=ComplexRoPE.Config(
                dim=dim // n_heads, max_seq_len=seq, theta=500000, scaling="llama"
            ),
            attn_backend="flex",
        ),
    )
    for layer in cfg.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    set_llama3_sharding_config(cfg, enable_sp=True)
    return cfg


@dataclass
class Variant:
    """One way of running the same model: its modules, optimizer and per-phase records."""

    name: str
    backend: str
    model: Any
    loss_fn: Any
    optimizer: Any
    pdims: Any
    replicated: list[torch.Tensor] = field(default_factory=list)
    step: int = 0
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    totals: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    comms: dict[str, Counter[str]] = field(default_factory=dict)
    paths: dict[str, Counter[str]] = field(default_factory=dict)
    """Per phase, where dtdispatch's calls went (one counted step; dtdispatch variants only)."""
    checks: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def context(self) -> contextlib.AbstractContextManager[Any]:
        if self.backend != "spmd_types":
            return contextlib.nullcontext()
        import torchtitan.distributed.utils as dist_utils

        return dist_utils.get_spmd_context(parallel_dims=self.pdims)()

    def clip(self) -> torch.Tensor:
        import torchtitan.distributed.utils as dist_utils

        params = list(self.model.parameters())
        if self.backend == "spmd_types":
            return _spmd_clip(params, self.replicated, self.pdims.get_mesh("tp").get_group())
        if self.name.startswith("dtdispatch+reduce"):
            dtdispatch.reduce_partial_grads(params)
        return dist_utils.clip_grad_norm_(
            params, MAX_NORM, foreach=True, pp_mesh=None, ep_enabled=False
        )


def _spmd_clip(
    params: list[torch.Tensor], replicated: list[torch.Tensor], group: Any
) -> torch.Tensor:
    """What ``spmd_types`` without FSDP needs to clip as DTensor does: the replicated parameters'
    partial gradients summed over the tp group (one coalesced all-reduce), the squared norm of the
    sharded gradients summed (one all-reduce) plus the replicated ones' counted once."""
    rep_grads = [p.grad for p in replicated if p.grad is not None]
    rep_ids = {id(p) for p in replicated}
    sharded = [p.grad for p in params if p.grad is not None and id(p) not in rep_ids]
    with torch.no_grad():
        buffer = torch.cat([g.reshape(-1) for g in rep_grads])
        dist.all_reduce(buffer, group=group)
        offset = 0
        for g in rep_grads:
            g.copy_(buffer[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        sharded_sq = torch.stack(torch._foreach_norm(sharded)).square().sum()
        dist.all_reduce(sharded_sq, group=group)
        rep_sq = torch.stack(torch._foreach_norm(rep_grads)).square().sum()
        total = (sharded_sq + rep_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, MAX_NORM, total, foreach=True)
    return total


def _batch(step: int, vocab: int, seq: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _build(name: str, dim: int, seq: int) -> Variant:
    import torchtitan.distributed.utils as dist_utils
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw

    backend = "spmd_types" if name == "spmd_types" else "partial_dtensor"
    cfg = _config(dim, seq)
    pdims = _parallel_dims(backend)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = cfg.build()
        global_shapes = {n: p.shape for n, p in cfg.build().named_parameters()}
    model.parallelize(pdims)
    ctx = dist_utils.get_spmd_context(parallel_dims=pdims) if backend == "spmd_types" else None
    with ctx() if ctx is not None else contextlib.nullcontext():
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights(buffer_device=None)
    if name.startswith("dtdispatch"):
        dtdispatch.accelerate(model)
    model.train()
    loss_fn = ChunkedLossWrapper.Config(
        loss_fn=CrossEntropyLoss.Config(global_vocab_size=cfg.vocab_size)
    ).build()
    loss_fn.set_lm_head(model.lm_head)
    model._skip_lm_head = True
    optimizer = default_adamw(lr=8e-4).build(model_parts=[model])
    # spmd_types parameters are local tensors: those of their global shape are the replicated ones.
    replicated = [
        p for n, p in model.named_parameters()
        if not isinstance(p, DTensor) and p.shape == global_shapes[n]
    ]
    return Variant(name, backend, model, loss_fn, optimizer, pdims, replicated)


def _copy_weights(src: Variant, dst: Variant) -> None:
    """Start ``dst`` from ``src``'s weights (their local shards)."""
    with torch.no_grad():
        for (name, p), (_, q) in zip(
            src.model.named_parameters(), dst.model.named_parameters(), strict=True
        ):
            a = p.to_local() if isinstance(p, DTensor) else p
            b = q.to_local() if isinstance(q, DTensor) else q
            if a.shape != b.shape:
                raise RuntimeError(f"{name}: local shapes differ, {a.shape} vs {b.shape}")
            b.copy_(a)


def _step(v: Variant, vocab: int, seq: int, batch: int,
          phase: Callable[[str, Callable[[], Any]], Any]) -> dict[str, torch.Tensor]:
    """One training step of ``v``, each phase run through ``phase(name, fn)``."""
    import torchtitan.distributed.utils as dist_utils
    from torchtitan.components.loss import IGNORE_INDEX

    # NOTE: torchtitan reads its backend from a module global at run time (loss, attention).
    dist_utils.set_spmd_backend(v.backend)
    _collectives.ENABLED = v.name != TORCH_COLLECTIVES
    v.optimizer.zero_grad()
    inputs, labels = _batch(v.step, vocab, seq, batch)
    v.step += 1
    valid = (labels != IGNORE_INDEX).sum()
    with v.context():
        out = phase("forward", lambda: v.model(inputs))
        loss = phase("loss", lambda: v.loss_fn(out, labels, valid)[0])
        phase("backward", loss.backward)
        norm = phase("clip", v.clip)
        phase("optimizer", v.optimizer.step)
    return {"loss": loss.detach(), "grad norm": norm.detach()}


def _timed(v: Variant) -> Callable[[str, Callable[[], Any]], Any]:
    def phase(name: str, fn: Callable[[], Any]) -> Any:
        dist.barrier()
        start = time.perf_counter()
        result = fn()
        dist.barrier()
        v.times[name].append(time.perf_counter() - start)
        return result

    return phase


class _NoModules:
    """Stands in for CommDebugMode's module tracker: the counts per module are not needed, and its
    hooks fail on torchtitan's chunked loss (the LM head called outside the model's forward)."""

    name = "Global"
    is_bw = False
    activation_checkpointing = False

    def __init__(self) -> None:
        self.module_parents_dict: dict[str, set[str]] = {"Global": set()}

    def __enter__(self) -> _NoModules:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


class _Collectives(CommDebugMode):
    """torch's CommDebugMode (its collective counts, and dtdispatch's support of it) without the
    module tracker."""

    def __init__(self) -> None:
        super().__init__()
        self.advanced_module_tracker = _NoModules()


def _paths() -> Counter[str]:
    """dtdispatch's counters since the last reset: cache hits below dispatch, calls handed to
    Python by reason (a hit whose plan only Python runs counts as a hit too), replays above
    dispatch, and calls above dispatch that took the stock path, by reason."""
    s = dtdispatch.stats()
    above = s["above"]
    paths: Counter[str] = Counter({"dispatch: cache hit": s["hits"]})
    paths.update({f"dispatch, Python: {r}": n for r, n in s["bailouts"].items()})
    paths["above: replayed"] = above["hits"]
    paths.update({f"above, stock: {r}": n for r, n in above["stepped_aside"].items()})
    paths.update({f"above, stock: {r}": n for r, n in above["negative"].items()})
    return +paths


def _counted(v: Variant) -> Callable[[str, Callable[[], Any]], Any]:
    def phase(name: str, fn: Callable[[], Any]) -> Any:
        dtdispatch.reset_stats()
        with _Collectives() as mode:
            result = fn()
        v.comms[name] = Counter(
            {str(op).rsplit(".", 1)[-1]: n for op, n in mode.get_comm_counts().items() if n}
        )
        if v.name.startswith("dtdispatch"):
            v.paths[name] = _paths()
        return result

    return phase


def _untimed(name: str, fn: Callable[[], Any]) -> Any:
    return fn()


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().double()


def _check(variants: dict[str, Variant], tolerance: float) -> list[str]:
    """Each variant's warmup records and final weights against ``dtensor``'s: ``dtdispatch``
    bitwise, the others within ``tolerance`` (relative to the largest magnitude)."""
    ref = variants["dtensor"]
    lines = []
    for name, v in variants.items():
        if v is ref:
            continue
        worst = 0.0
        records = [(r[k], s[k]) for r, s in zip(v.checks, ref.checks, strict=True) for k in r]
        params = list(zip(v.model.parameters(), ref.model.parameters(), strict=True))
        for a, b in records + params:
            x, y = _local(a), _local(b)
            scale = max(float(y.abs().max()), 1e-30)
            worst = max(worst, float((x - y).abs().max()) / scale)
        ok = worst == 0.0 if name == "dtdispatch" else worst <= tolerance
        lines.append(f"{name} vs dtensor: max relative difference {worst:.3g} "
                     f"({'bitwise' if worst == 0 else 'within tolerance' if ok else 'FAILED'})")
    return lines


_CATEGORIES = (  # the first match wins: (name, substrings of "path function")
    ("collective waits and barriers", ("wait_tensor", "_distributed_c10d.wait", "barrier")),
    ("collective launches (C++)", ("_c10d_functional.", "allgather", "reduce_scatter",
                                   "all_gather_single", "allreduce")),
    ("autograd engine (C++: backward ops, their dispatch)", ("run_backward",)),
    ("dtdispatch Python", ("dtdispatch/",)),
    ("torchtitan Python", ("torchtitan/",)),
    ("spmd_types Python", ("spmd_types/",)),
    ("torch DTensor Python", ("torch/distributed/tensor/",)),
    ("torch c10d and functional collectives Python", ("torch/distributed/",)),
    ("custom-op, pytree and op-overload Python", ("torch/_library", "torch/utils/_pytree",
                                                  "torch/_ops.py", "torch/_dynamo")),
    ("autograd Function machinery", ("torch/autograd/",)),
    ("optimizer and clipping Python", ("torch/optim/", "torch/nn/utils/")),
    ("nn.Module machinery", ("torch/nn/modules/",)),
    ("ops called from Python (C++: kernels, dispatch, dtdispatch's C)", ("<built-in method",
                                                                        "<method ")),
)


def _profile(v: Variant, steps: int, vocab: int, seq: int, batch: int) -> dict[str, float]:
    """ms per step of own time by category over ``steps`` untimed steps under cProfile."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        _step(v, vocab, seq, batch, _untimed)
    profiler.disable()
    from step import _own_time  # benchmarks/, this script's directory

    own = _own_time(pstats.Stats(profiler), _CATEGORIES, "other")
    return {name: 1e3 * seconds / steps for name, seconds in own.items()}


def _profile_table(profiles: dict[str, dict[str, float]], steps: int) -> str:
    names = list(profiles)
    last = profiles[names[-1]]
    keys = sorted({k for p in profiles.values() for k in p}, key=lambda k: -last.get(k, 0.0))
    rows = [f"Own time per step by category (cProfile, rank 0, {steps} steps per variant; "
            "profiled ms, slower than unprofiled ones):", "",
            "| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        cells = " | ".join(f"{profiles[n].get(k, 0.0):.2f}" for n in names)
        rows.append(f"| {k} | {cells} |")
    totals = " | ".join(f"{sum(profiles[n].values()):.2f}" for n in names)
    return "\n".join([*rows, f"| all | {totals} |", ""])


def _table(dim: int, variants: dict[str, Variant],
           checks: list[str]) -> str:
    ms = {n: {p: 1e3 * statistics.median(v.times[p]) for p in PHASES} for n, v in variants.items()}
    totals = {n: 1e3 * statistics.median(v.totals) for n, v in variants.items()}
    cpu = {n: 1e3 * statistics.median(v.cpu) for n, v in variants.items()}
    head = "| variant | " + " | ".join(PHASES) + " | step |"
    rows = [f"### dim {dim}", "", "Median ms per phase (barrier before and after each), and "
            "process CPU ms per step on rank 0:", "", head + " step CPU |",
            "|" + "---|" * (len(PHASES) + 3)]
    for n in variants:
        cells = " | ".join(f"{ms[n][p]:.2f}" for p in PHASES)
        rows.append(f"| {n} | {cells} | {totals[n]:.2f} | {cpu[n]:.2f} |")
    rows += ["", "Collectives per phase (CommDebugMode, one step):", "",
             head.replace(" step |", " all |"), "|" + "---|" * (len(PHASES) + 2)]
    for n, v in variants.items():
        cells = [", ".join(f"{op} {k}" for op, k in sorted(v.comms[p].items())) or "-"
                 for p in PHASES]
        total = sum((v.comms[p] for p in PHASES), Counter())
        rows.append(f"| {n} | " + " | ".join(cells) + " | "
                    + (", ".join(f"{op} {k}" for op, k in sorted(total.items())) or "-") + " |")
    for n, v in variants.items():
        if not v.paths:
            continue
        rows += ["", f"Where {n}'s calls went per phase (dtdispatch.stats(), one step, under the "
                 "collective counting mode):", "", "| path | " + " | ".join(PHASES) + " |",
                 "|" + "---|" * (len(PHASES) + 1)]
        keys = sorted({k for c in v.paths.values() for k in c})
        for k in keys:
            rows.append(f"| {k} | " + " | ".join(str(v.paths[p].get(k, 0)) for p in PHASES) + " |")
    rows += ["", "Checks over the warmup steps and the final weights: " + "; ".join(checks), ""]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then N untimed steps per variant under cProfile (rank 0)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/titan_phases.md")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.autograd.set_multithreading_enabled(False)
    _patch_torchtitan()
    rank = dist.get_rank()
    if dist.get_world_size() != 2:
        raise SystemExit("titan_phases.py runs on 2 ranks (tp=2): torchrun --nproc-per-node 2")

    sections, failed = [], False
    for dim in args.dims:
        variants = {name: _build(name, dim, args.seq) for name in VARIANTS}
        for name in VARIANTS:
            if name != "dtensor":
                _copy_weights(variants["dtensor"], variants[name])
        vocab = 2048
        for _ in range(args.warmup):
            for v in variants.values():
                v.checks.append(_step(v, vocab, args.seq, args.batch, _untimed))
        checks = _check(variants, args.tolerance)
        failed |= any("FAILED" in line for line in checks)
        order = list(variants.values())
        for r in range(args.rounds):
            for v in order[r % len(order):] + order[: r % len(order)]:
                cpu = time.process_time()
                _step(v, vocab, args.seq, args.batch, _timed(v))
                v.cpu.append(time.process_time() - cpu)
                v.totals.append(sum(v.times[p][-1] for p in PHASES))
        for v in variants.values():
            _step(v, vocab, args.seq, args.batch, _counted(v))
        sections.append(_table(dim, variants, checks))
        if args.profile:
            profiles = {}
            for name in ("spmd_types", "dtensor", "dtdispatch+reduce"):
                dist.barrier()
                if rank == 0:
                    profiles[name] = _profile(variants[name], args.profile, vocab, args.seq,
                                              args.batch)
                else:
                    for _ in range(args.profile):
                        _step(variants[name], vocab, args.seq, args.batch, _untimed)
            if rank == 0:
                sections[-1] += "\n" + _profile_table(profiles, args.profile)
        if rank == 0:
            print(sections[-1], flush=True)

    if rank == 0:
        header = [
            "# torchtitan Llama3 per phase: spmd_types vs DTensor vs dtdispatch",
            "",
            f"`benchmarks/titan_phases.py --dims {' '.join(map(str, args.dims))} --rounds "
            f"{args.rounds} --warmup {args.warmup} --seq {args.seq} --batch {args.batch}"
            f"{f' --profile {args.profile}' if args.profile else ''}`: "
            f"torch {torch.__version__}, 2 gloo ranks (tp=2, sequence parallel), {LAYERS} layers, "
            f"{os.cpu_count()} CPUs; medians over {args.rounds} rounds, variants interleaved.",
            "",
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(header + sections))
        print(f"wrote {args.out}")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
