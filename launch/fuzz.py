"""Differential fuzzing of dtdispatch against stock DTensor on real ranks (``make fuzz``).

    torchrun --standalone --nproc-per-node 4 launch/fuzz.py --seconds 600 --seed 1

Runs random programs (``dtdispatch.testing.fuzz``) on both implementations until the time is up,
shrinks each failing program and prints it as a runnable script; prints programs/s and how many
programs drew each feature (ambient states, complex, meta, tied parameters, compiled regions, ...)
and how many of those failed, on rank 0; exits 1 when anything failed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch.distributed as dist
from _bootstrap import exit_now, init_distributed

from dtdispatch.testing.fuzz import Program, fuzz, render


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (rank 0's clock)")
    parser.add_argument("--seed", type=int, default=0, help="program seed")
    parser.add_argument("--first-index", type=int, default=0, help="first program index")
    parser.add_argument(
        "--shrink-seconds", type=float, default=60.0, help="shrinking budget per failing program"
    )
    parser.add_argument(
        "--compile-share",
        type=float,
        default=0.25,
        help="most of the time programs with a compiled region may take (others are skipped)",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="rank 0 prints each program before running it (a gloo abort prints no report)",
    )
    args = parser.parse_args()
    info = init_distributed()
    began = time.monotonic()
    tally: dict[str, int] = {}
    ran, failures = fuzz(
        args.seed,
        seconds=args.seconds,
        start=args.first_index,
        shrink_s=args.shrink_seconds,
        compile_share=args.compile_share,
        tally=tally,
        trace=_print_program if args.trace and info.rank == 0 else None,
    )
    elapsed = time.monotonic() - began
    if info.rank == 0:
        for report in failures:
            print(f"FAIL {report}\n", flush=True)
        drawn = ", ".join(f"{name} {n}" for name, n in sorted(tally.items()))
        print(f"programs per feature: {drawn or 'none'}", flush=True)
        print(
            f"fuzz seed {args.seed} world size {info.world_size}: {ran} programs "
            f"(indices {args.first_index}..{args.first_index + ran - 1}) in {elapsed:.1f} s "
            f"({ran / elapsed:.2f} programs/s), {len(failures)} failing",
            flush=True,
        )
    dist.destroy_process_group()
    return 1 if failures else 0


def _print_program(index: int, program: Program) -> None:
    print(f"fuzz program {index}:\n{render(program)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    exit_now(main())
