"""Whole steps in instructions: ``step.py``'s models under callgrind, one variant per process.

    python benchmarks/step_instructions.py                      # both models, all variants
    python benchmarks/step_instructions.py --models llama --workloads step

Wall clock on a shared 2-core VM moves by more than the differences worth measuring; instruction
counts do not. Each (model, workload, variant) runs in its own process under
``valgrind --tool=callgrind`` with instrumentation off until the measured loop: ``--warmup`` calls
first (plans cached, optimizer state made), then ``--calls`` calls with collection on, switched by
callgrind's client requests from a small C library built here with the system compiler. Gloo;
with ``--world-size N`` above 1, rank 0 runs under callgrind and ranks 1..N-1 natively (the
client requests do nothing outside valgrind), and the count is rank 0's, its gloo threads
included. Variants: ``stock`` (torch's parallel styles on plain DTensors), ``default``
(``dtdispatch.accelerate``), ``off`` (the same with the path above dispatch off,
``DTDISPATCH_ABOVE=0``). Prints millions of instructions per call and the ratio to stock. Needs
``valgrind`` and its ``callgrind.h`` header; takes about half a minute per process.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("stock", "default", "off")
_TOGGLE_C = """
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS;
                      CALLGRIND_TOGGLE_COLLECT; }
void cg_stop(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS;
                     CALLGRIND_STOP_INSTRUMENTATION; }
"""


def _worker(args: argparse.Namespace) -> None:
    import ctypes
    import warnings

    warnings.simplefilter("ignore")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "launch"))
    toggle = ctypes.CDLL(args.library)
    import step
    import torch
    import torch.distributed as dist
    from _bootstrap import init_distributed
    from torch.distributed.device_mesh import init_device_mesh

    from dtdispatch import _dispatcher, _native

    torch.set_num_threads(1)
    init_distributed()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if args.variant == "off":
        _dispatcher.install(_native.DEFAULT, above=False)
    run = step._runs(args.model, mesh)["stock" if args.variant == "stock" else "dtdispatch"]
    fn = run.step if args.workload == "step" else run.forward
    for _ in range(args.warmup):
        fn()
    toggle.cg_start()
    for _ in range(args.calls):
        fn()
    toggle.cg_stop()
    dist.destroy_process_group()


def _measure(
    args: argparse.Namespace,
    library: str,
    out: Path,
    model: str,
    workload: str,
    variant: str,
    port: int,
) -> float:
    def env(rank: int) -> dict[str, str]:
        n = str(args.world_size)
        return dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=n,
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=n,
        )

    prefix = out / f"{model}.{workload}.{variant}"
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--collect-atstart=no",
        f"--callgrind-out-file={prefix}.%p",
    ]
    worker = [
        sys.executable,
        __file__,
        "--worker",
        "--library",
        library,
        "--model",
        model,
        "--workload",
        workload,
        "--variant",
        variant,
        "--warmup",
        str(args.warmup),
        "--calls",
        str(args.calls),
    ]
    others = [
        subprocess.Popen(worker, env=env(rank), stdout=subprocess.DEVNULL)
        for rank in range(1, args.world_size)
    ]
    try:
        subprocess.run(valgrind + worker, env=env(0), check=True, capture_output=True)
    except BaseException:
        for other in others:
            other.kill()
        raise
    if any(other.wait(timeout=300) for other in others):
        raise RuntimeError(f"a rank other than 0 failed in {prefix.name}")
    for dump in out.glob(f"{prefix.name}.*.1"):
        totals = re.search(r"^totals: (\d+)", dump.read_text(), re.M)
        if totals:
            return int(totals.group(1)) / args.calls / 1e6
    raise RuntimeError(f"no callgrind dump for {prefix.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["throughput", "llama"])
    parser.add_argument("--workloads", nargs="+", default=["step", "forward"])
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument(
        "--world-size", type=int, default=1, help="ranks; rank 0 is measured (default: 1)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "toggle.c").write_text(_TOGGLE_C)
        library = str(out / "libtoggle.so")
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-O2", "-o", library, str(out / "toggle.c")], check=True
        )
        print(
            f"M instructions per call ({args.calls} after {args.warmup} warm-up), "
            f"world size {args.world_size}, rank 0"
        )
        print("| model: workload | stock | default | off | default/stock | off/stock |")
        print("|---|---|---|---|---|---|")
        port = 29800
        for model in args.models:
            for workload in args.workloads:
                m = {}
                for variant in VARIANTS:
                    port += 1
                    m[variant] = _measure(args, library, out, model, workload, variant, port)
                print(
                    f"| {model}: {workload} | {m['stock']:.2f} | {m['default']:.2f} | "
                    f"{m['off']:.2f} | {m['default'] / m['stock']:.3f} | "
                    f"{m['off'] / m['stock']:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
