"""Throughput run: a tensor-parallel transformer block trained on stock DTensor and on dtdispatch,
interleaved.

    torchrun --standalone --nproc-per-node N launch/throughput.py \\
        [--steps 10] [--rounds 7] [--out DIR]
    mpiexec -n N python launch/throughput.py

Both models are built from the same seed (``dtdispatch.testing.training``: parallelize_module with
torch's parallel styles, then ``dtdispatch.accelerate`` for one of them). Rounds alternate which
model goes first; the step time reported is the median over rounds of the mean step time of a round.
Every rank writes ``throughput_rank{R}.json``; rank 0 prints the comparison and the telemetry of all
ranks merged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _bootstrap import exit_now, init_distributed
from torch.distributed.device_mesh import init_device_mesh

import dtdispatch
from dtdispatch.testing.training import TrainConfig, Trainer


def _merge(all_stats: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"hits": 0, "misses": 0, "entries": 0, "evictions": 0, "bailouts": {}}
    for s in all_stats:
        for field in ("hits", "misses", "entries", "evictions"):
            total[field] += s[field]
        for reason, n in s["bailouts"].items():
            total["bailouts"][reason] = total["bailouts"].get(reason, 0) + n
    return total


def _dispatches(stats: dict[str, Any]) -> int:
    return int(stats["hits"] + stats["misses"] + stats["bailouts"].get("no key", 0)
               + stats["bailouts"].get("custom handler", 0))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    info = init_distributed()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    config = TrainConfig(optimizer="adamw", foreach=True)
    trainers = {
        "stock": Trainer(mesh, config, accelerate=False),
        "dtdispatch": Trainer(mesh, config, accelerate=True),
    }
    for trainer in trainers.values():  # warm-up: every plan cached, optimizer state created
        for _ in range(3):
            trainer.step()
    dtdispatch.reset_stats()
    times: dict[str, list[float]] = {name: [] for name in trainers}
    stock_native = torch._C._get_DTensor_sharding_propagator_cache_stats()
    for r in range(args.rounds):
        order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                trainers[name].step()
            times[name].append((time.perf_counter() - start) / args.steps)
    stock_after = torch._C._get_DTensor_sharding_propagator_cache_stats()
    steps_each = args.rounds * args.steps
    stats = dtdispatch.stats()
    stats.pop("threads")
    result = {
        "rank": info.rank,
        "world_size": info.world_size,
        "backend": info.backend,
        "torch": torch.__version__,
        "step_ms": {name: statistics.median(t) * 1e3 for name, t in times.items()},
        "steps_per_s": {name: 1.0 / statistics.median(t) for name, t in times.items()},
        "dtdispatch_dispatches_per_step": _dispatches(stats) / steps_each,
        "stock_dispatches_per_step": (sum(stock_after) - sum(stock_native)) / steps_each,
        "telemetry": stats,
    }
    result["ratio"] = result["step_ms"]["dtdispatch"] / result["step_ms"]["stock"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"throughput_ws{info.world_size}_rank{info.rank}.json").write_text(
        json.dumps(result, indent=1)
    )
    gathered: list[dict[str, Any]] = [{} for _ in range(info.world_size)]
    dist.all_gather_object(gathered, result)
    if info.rank == 0:
        print(
            f"dtdispatch throughput: world size {info.world_size} ({info.backend}), "
            f"{args.rounds} rounds x "
            f"{args.steps} steps, AdamW foreach + clip_grad_norm_"
        )
        for res in gathered:
            print(
                f"rank {res['rank']}: stock {res['step_ms']['stock']:.2f} ms/step "
                f"({res['steps_per_s']['stock']:.1f} steps/s), "
                f"dtdispatch {res['step_ms']['dtdispatch']:.2f} "
                f"ms/step ({res['steps_per_s']['dtdispatch']:.1f} steps/s), "
                f"ratio {res['ratio']:.2f}; "
                f"dispatches/step: dtdispatch {res['dtdispatch_dispatches_per_step']:.0f}, "
                f"torch's fast path during the stock run {res['stock_dispatches_per_step']:.0f}"
            )
        merged = _merge([res["telemetry"] for res in gathered])
        print(
            f"merged telemetry (all ranks, timed rounds): hits={merged['hits']} "
            f"misses={merged['misses']} entries={merged['entries']} "
            f"evictions={merged['evictions']} bailouts={merged['bailouts']}"
        )
        ratio = statistics.median(res["ratio"] for res in gathered)
        print(f"SUMMARY: step time dtdispatch/stock = {ratio:.2f} (median over ranks)")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_now(main())
