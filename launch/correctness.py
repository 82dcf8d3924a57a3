"""Correctness run: the conformance table on stock DTensor vs dtdispatch, on every rank, both
implementations.

    torchrun --standalone --nproc-per-node N launch/correctness.py
    mpiexec -n N python launch/correctness.py

Rank 0 prints a pass/fail table (a case fails if it fails on any rank) and the merged telemetry; the
exit code is 1 when any case failed anywhere.
"""

from __future__ import annotations

import warnings

import torch.distributed as dist
from _bootstrap import exit_now, init_distributed
from torch.distributed.device_mesh import init_device_mesh

import dtdispatch
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch.testing.conformance import CASES, CASES_2D, run_all
from dtdispatch.testing.training import run_training_parity


def main() -> int:
    warnings.simplefilter("ignore")  # torch's per-call warnings would drown the table
    info = init_distributed()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    suites = [("1d", CASES, mesh)]
    if info.world_size == 4:
        suites.append(("2d", CASES_2D, init_device_mesh(info.device.type, (2, 2))))
    rows: list[tuple[str, str, str, str]] = []
    for impl in sorted(native.implementations()):
        dispatcher.install(impl)
        for suite, cases, suite_mesh in suites:
            for name, failure in run_all(cases, suite_mesh):
                rows.append((impl, suite, name, failure))
    # Training parity: a tensor-parallel block trained on stock and on dtdispatch with every
    # optimizer, compared bitwise (plus coverage >= 95%, a plan cache that stops growing); at world
    # size 4 also on a ("dp", "tp") 2x2 mesh: tensor parallel on "tp", data parallel on "dp".
    train_meshes = [("1d", mesh)]
    if info.world_size == 4:
        mesh_2d = init_device_mesh(info.device.type, (2, 2), mesh_dim_names=("dp", "tp"))
        train_meshes.append(("2d", mesh_2d))
    for impl in sorted(native.implementations()):
        dispatcher.install(impl)
        for suite, train_mesh in train_meshes:
            failure = run_training_parity(train_mesh, steps=5)
            rows.append((impl, "train", f"training parity {suite}", failure))
    gathered: list[list[tuple[str, str, str, str]]] = [[] for _ in range(info.world_size)]
    dist.all_gather_object(gathered, rows)
    stats = dtdispatch.stats()
    stats.pop("threads")
    all_stats: list[dict[str, object]] = [{} for _ in range(info.world_size)]
    dist.all_gather_object(all_stats, stats)
    failed = 0
    if info.rank == 0:
        print(
            f"dtdispatch correctness: world size {info.world_size}, {info.backend}, "
            f"launcher {info.launcher}"
        )
        print(f"{'impl':7} {'suite':5} {'case':34} result")
        for i, (impl, suite, name, _) in enumerate(rows):
            failures = [
                (r, per_rank[i][3]) for r, per_rank in enumerate(gathered) if per_rank[i][3]
            ]
            failed += bool(failures)
            result = (
                "pass"
                if not failures
                else f"FAIL on ranks {[r for r, _ in failures]}: {failures[0][1][:120]}"
            )
            print(f"{impl:7} {suite:5} {name:34} {result}")
        for r, s in enumerate(all_stats):
            print(
                f"rank {r} telemetry: hits={s['hits']} misses={s['misses']} entries={s['entries']} "
                f"bailouts={s['bailouts']}"
            )
        print(f"SUMMARY: {len(rows) - failed}/{len(rows)} passed, {failed} failed")
    flag = [failed]
    dist.broadcast_object_list(flag, src=0)
    dist.destroy_process_group()
    return 1 if flag[0] else 0


if __name__ == "__main__":
    exit_now(main())
