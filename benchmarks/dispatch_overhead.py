"""Per-op dispatch overhead: local tensor vs stock DTensor vs dtdispatch (Python twin) vs dtdispatch
(native).

    python benchmarks/dispatch_overhead.py        # world sizes 1, 2, 4 via torchrun; writes results
    python benchmarks/dispatch_overhead.py --world-sizes 1 --reps 9

Same process, same inputs, variants interleaved in rotating order within every round; the number
reported is the median over rounds of the per-call mean of one batch. Cache-miss cost: the first
call after clearing the caches (torch's C++ and Python caches for stock, dtdispatch's plan cache for
ours), median over repeats. Outputs (``--out``, default benchmarks/results): dispatch_overhead.json,
dispatch_overhead.md and, when matplotlib is installed, dispatch_overhead.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("local", "stock", "python", "native")


def _cases(mesh: Any) -> list[tuple[str, Callable[..., Any], tuple[str, ...]]]:
    import torch
    import torch.nn.functional as F

    mm = torch.mm
    return [
        ("add S0", torch.add, ("S0", "S0")),
        ("add R", torch.add, ("R", "R")),
        ("mul S0", torch.mul, ("S0", "S0")),
        ("relu S0", torch.relu, ("S0",)),
        ("relu R", torch.relu, ("R",)),
        ("sum S0", torch.sum, ("S0",)),
        ("sum(dim=1) S0", lambda a: a.sum(1), ("S0",)),
        ("transpose S0", lambda a: a.transpose(0, 1), ("S0",)),
        ("softmax S0", lambda a: torch.softmax(a, -1), ("S0",)),
        ("mm S0xR", mm, ("S0", "R")),
        ("view S0", lambda a: a.view(64), ("S0",)),
        ("reshape S0", lambda a: a.reshape(4, 16), ("S0",)),
        ("add S0+R", torch.add, ("S0", "R")),
        ("mm S0xS0", mm, ("S0", "S0")),
        ("cat dim0 S0", lambda a, b: torch.cat([a, b]), ("S0", "S0")),
        ("cat dim1 S0", lambda a, b: torch.cat([a, b], 1), ("S0", "S0")),
        ("add_ S0", lambda a, b: a.add_(b), ("S0", "S0")),
        ("dropout S0", lambda a: F.dropout(a, 0.1, training=True), ("S0",)),
    ]


def _worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "launch"))
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist
    from _bootstrap import init_distributed
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import dtdispatch
    from dtdispatch import _dispatcher as dispatcher
    from dtdispatch import _native as native

    info = init_distributed()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    impls = sorted(native.implementations())
    torch.manual_seed(0)
    rows = []
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    for name, fn, codes in _cases(mesh):
        globals_ = [torch.randn(8, 8, device=info.device) for _ in codes]
        stock = [
            distribute_tensor(g, mesh, [Shard(0) if c == "S0" else Replicate()])
            for g, c in zip(globals_, codes, strict=False)
        ]
        fast = [
            dtdispatch.accelerate(DTensor.from_local(s._local_tensor.clone(), mesh, s.placements))
            for s in stock
        ]
        inputs = {"local": globals_, "stock": stock, "python": fast, "native": fast}
        variants = ["local", "stock", *impls]
        samples: dict[str, list[float]] = {v: [] for v in variants}
        for v in variants:  # warm-up: fill every cache
            if v in impls:
                dispatcher.install(v)
            for _ in range(3):
                fn(*inputs[v])
        for round_ in range(args.reps):
            order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
            for v in order:
                if v in impls:
                    dispatcher.install(v)
                dist.barrier()
                sync()
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn(*inputs[v])
                sync()
                samples[v].append((time.perf_counter() - start) / args.calls * 1e6)
        misses: dict[str, list[float]] = {"stock": [], **{v: [] for v in impls}}
        for _ in range(args.miss_reps):
            for v in misses:
                if v == "stock":
                    torch._C._clear_DTensor_sharding_propagator_cache()
                    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
                else:
                    dispatcher.install(v)
                    dtdispatch.clear_cache()
                dist.barrier()
                start = time.perf_counter()
                fn(*inputs[v])
                sync()
                misses[v].append((time.perf_counter() - start) * 1e6)
        row = {"op": name, **{v: statistics.median(s) for v, s in samples.items()}}
        row.update({f"miss {v}": statistics.median(s) for v, s in misses.items()})
        rows.append(row)
        if info.rank == 0:
            print(
                f"[ws {info.world_size}] {name:16} "
                + " ".join(f"{v}={row[v]:.1f}" for v in variants),
                file=sys.stderr,
                flush=True,
            )
    if info.rank == 0:
        result = {
            "world_size": info.world_size,
            "backend": info.backend,
            "device": torch.cuda.get_device_name()
            if info.device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "implementations": impls,
            "reps": args.reps,
            "calls": args.calls,
            "rows": rows,
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"dispatch_overhead_ws{info.world_size}.json").write_text(
            json.dumps(result, indent=1)
        )
    dist.destroy_process_group()


def _table(results: list[dict[str, Any]]) -> str:
    lines = []
    for res in results:
        lines.append(
            f"\n### world size {res['world_size']} ({res['backend']}, {res['device']}, "
            f"torch {res['torch']})\n"
        )
        lines.append(
            "| op | local | stock | dtdispatch py | dtdispatch native | native/stock "
            "| native − local "  # noqa: RUF001 (a real minus sign in the results table)
            "| miss stock | miss native | miss ratio |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            nat = r.get("native", float("nan"))
            miss_nat = r.get("miss native", float("nan"))
            lines.append(
                f"| {r['op']} | {r['local']:.1f} | {r['stock']:.1f} | "
                f"{r.get('python', float('nan')):.1f} | "
                f"{nat:.1f} | {nat / r['stock']:.2f} | {nat - r['local']:.1f} | "
                f"{r['miss stock']:.0f} | "
                f"{miss_nat:.0f} | {miss_nat / r['miss stock']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _plot(results: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(results), 1, figsize=(12, 4 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results, strict=False):
        ops = [r["op"] for r in res["rows"]]
        width = 0.2
        for i, v in enumerate(VARIANTS):
            vals = [r.get(v, 0.0) for r in res["rows"]]
            ax.bar([x + (i - 1.5) * width for x in range(len(ops))], vals, width, label=v)
        ax.set_xticks(range(len(ops)), ops, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("µs per op (median)")
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
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--reps", type=int, default=15, help="interleaved rounds per op (median over them)"
    )
    parser.add_argument("--calls", type=int, default=200, help="calls per timed batch")
    parser.add_argument("--miss-reps", type=int, default=9)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--replot", action="store_true", help="rewrite the table and plot from --out's JSON, no run"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    out = Path(args.out)
    results = json.loads((out / "dispatch_overhead.json").read_text()) if args.replot else []
    for n in [] if args.replot else args.world_sizes:
        print(f"world size {n}: starting {n} rank(s) under torchrun", file=sys.stderr, flush=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            __file__,
            "--worker",
            "--reps",
            str(args.reps),
            "--calls",
            str(args.calls),
            "--miss-reps",
            str(args.miss_reps),
            "--out",
            args.out,
        ]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results.append(json.loads((out / f"dispatch_overhead_ws{n}.json").read_text()))
    (out / "dispatch_overhead.json").write_text(json.dumps(results, indent=1))
    table = _table(results)
    (out / "dispatch_overhead.md").write_text(table)
    plotted = _plot(results, out / "dispatch_overhead.png")
    print(table)
    print(
        f"wrote {out}/dispatch_overhead.{{json,md}}"
        + (" and .png" if plotted else " (no matplotlib: no plot)")
    )


if __name__ == "__main__":
    main()
