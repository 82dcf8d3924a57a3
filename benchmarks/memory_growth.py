"""Memory growth of a training loop: stock DTensor vs dtdispatch, N optimizer steps after warm-up.

    torchrun --standalone --nproc-per-node 2 benchmarks/memory_growth.py [--steps 200] [--json F]
    python benchmarks/memory_growth.py          # a world of one

The loop is ``dtdispatch.testing.training.Trainer``: a tensor-parallel transformer block and head
under torch's parallel styles, a per-step learning rate (LambdaLR), ``clip_grad_norm_``, the
optimizer, and in the "+ema" rows an EMA of the weights with a warm-up decay (``lerp_`` with a
weight that changes every step). For each loop and each variant (stock; dtdispatch with each
implementation) it counts, after step 2 and after step N: live Python objects
(``len(gc.get_objects())`` after ``gc.collect()``) and the sharding cache: for stock, torch's own
cache misses (each inserts an entry, torch's cache is unbounded); for dtdispatch, its plan-cache
entry count; the table shows how many entries were added between step 2 and step N. Both caches are
cleared before each run so earlier runs cannot pre-fill them. Rank 0 prints a markdown table (the
one in ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch"))
from _bootstrap import init_distributed
from torch.distributed.device_mesh import init_device_mesh

import dtdispatch
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch.testing.training import TrainConfig, Trainer

LOOPS: dict[str, TrainConfig] = {
    "sgd foreach": TrainConfig(optimizer="sgd", foreach=True),
    "sgd single": TrainConfig(optimizer="sgd", foreach=False),
    "adam foreach": TrainConfig(optimizer="adam", foreach=True),
    "adam single": TrainConfig(optimizer="adam", foreach=False),
    "adamw foreach": TrainConfig(optimizer="adamw", foreach=True),
    "adamw single": TrainConfig(optimizer="adamw", foreach=False),
    "adamw single + ema": TrainConfig(optimizer="adamw", foreach=False, loss="partial", ema=True),
}


def _live_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def _cache_size(variant: str) -> int:
    if variant == "stock":
        counters = getattr(torch._C, "_get_DTensor_sharding_propagator_cache_stats", None)
        return int(counters()[1]) if counters is not None else -1  # -1: torch cannot tell
    return int(dtdispatch.stats()["entries"])


def measure(mesh: Any, config: TrainConfig, variant: str, steps: int) -> dict[str, Any]:
    """One run: objects and cache size after step 2 and after step ``steps``, and the time per
    step."""
    clear_torch_cache = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_torch_cache is not None:
        clear_torch_cache()
    dtdispatch.clear_cache()
    if variant != "stock":
        dispatcher.install(variant.split(":")[1])
    trainer = Trainer(mesh, config, accelerate=variant != "stock")
    trainer.step()
    trainer.step()
    objects, cache = _live_objects(), _cache_size(variant)
    start = time.perf_counter()
    for _ in range(steps - 2):
        trainer.step()
    elapsed = time.perf_counter() - start
    result = {
        "objects_step2": objects,
        "objects_end": _live_objects(),
        "cache_step2": cache,
        "cache_end": _cache_size(variant),
        "ms_per_step": 1e3 * elapsed / (steps - 2),
    }
    del trainer
    gc.collect()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--loops", nargs="*", default=list(LOOPS), choices=list(LOOPS))
    parser.add_argument(
        "--impls",
        nargs="*",
        default=sorted(native.implementations()),
        help="dtdispatch implementations to measure (default: all available)",
    )
    parser.add_argument(
        "--json", default="", help="write every rank's results here (rank 0 writes)"
    )
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3")
    warnings.simplefilter("ignore")
    info = init_distributed()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    variants = ["stock"] + [f"dtdispatch:{impl}" for impl in args.impls]
    rows: list[dict[str, Any]] = []
    for loop in args.loops:
        for variant in variants:
            rows.append(
                {
                    "loop": loop,
                    "variant": variant,
                    **measure(mesh, LOOPS[loop], variant, args.steps),
                }
            )
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, rows)
    if info.rank == 0:
        n = args.steps
        print(
            f"memory growth over steps 2..{n}: world size {info.world_size}, {info.backend}, "
            f"torch {torch.__version__}; objects of rank 0 (worst rank in brackets)"
        )
        print(
            f"| loop | variant | live objects after step 2 | after step {n} "
            "| growth (worst rank) | "
            f"new cache entries | ms/step |"
        )
        print("|---|---|---|---|---|---|---|")
        for i, row in enumerate(rows):
            growth = row["objects_end"] - row["objects_step2"]
            worst = max((r[i]["objects_end"] - r[i]["objects_step2"] for r in gathered), key=abs)
            print(
                f"| {row['loop']} | {row['variant']} | {row['objects_step2']} "
                f"| {row['objects_end']} | "
                f"{growth:+d} ({worst:+d}) | {row['cache_end'] - row['cache_step2']:+d} | "
                f"{row['ms_per_step']:.1f} |"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"world_size": info.world_size, "steps": n, "ranks": gathered}, f, indent=1
                )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
