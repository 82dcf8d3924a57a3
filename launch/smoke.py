"""Launch smoke workload: build meshes, run stock DTensor ops, check them against a single-rank
reference. Prints one line per rank and a summary on rank 0; exits 1 if any check failed anywhere.

    torchrun --standalone --nproc-per-node N launch/smoke.py
    mpiexec -n N python launch/smoke.py

Meshes: 1-D over all ranks; 2-D (2x2, dims "dp", "tp") when N == 4; a 1-D sub-mesh over ranks
0..N-2, so the last rank is non-participating (at N == 1 the sub-mesh is rank 0 alone).
DTDISPATCH_SMOKE_INJECT_FAILURE=1 corrupts one result on the last rank: the run must then fail.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from _bootstrap import DistInfo, exit_now, init_distributed
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

INJECT_ENV = "DTDISPATCH_SMOKE_INJECT_FAILURE"


class Checks:
    """Runs named checks on this rank and remembers the failures."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.count = 0
        self.failed: list[str] = []
        self.corrupt = os.environ.get(INJECT_ENV) == "1" and info.rank == info.world_size - 1

    def close(self, name: str, compute: Callable[[], torch.Tensor], expected: torch.Tensor) -> None:
        """Check that ``compute()`` (a plain tensor on this rank) equals ``expected``."""
        self.count += 1
        try:
            got = compute().cpu()
            if self.corrupt:  # the injected failure: one wrong value, on one rank
                got, self.corrupt = got + 1, False
            ok = got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
        except Exception as e:  # report and go on, so every rank still reaches the summary
            print(f"rank {self.info.rank}: {name} raised {type(e).__name__}: {e}", flush=True)
            ok = False
        if not ok:
            self.failed.append(name)

    def true(self, name: str, condition: bool) -> None:
        self.count += 1
        if not condition:
            self.failed.append(name)


def run(info: DistInfo, checks: Checks) -> list[str]:
    """Run the workload; returns the names of the meshes used."""
    dev = info.device.type
    torch.manual_seed(0)  # the same inputs on every rank: each rank holds the full reference
    a = torch.randn(8, 4)
    b = torch.randn(4, 6)

    mesh = init_device_mesh(dev, (info.world_size,))
    da = distribute_tensor(a, mesh, [Shard(0)])
    db = distribute_tensor(b, mesh, [Replicate()])
    checks.close("1d add", lambda: (da + 1).full_tensor(), a + 1)
    checks.close("1d mul", lambda: (da * da).full_tensor(), a * a)
    checks.close("1d relu", lambda: torch.relu(da).full_tensor(), torch.relu(a))
    checks.close("1d sum", lambda: da.sum().full_tensor(), a.sum())
    checks.close("1d mm", lambda: (da @ db).full_tensor(), a @ b)
    checks.close("1d t", lambda: da.t().full_tensor(), a.t())
    checks.close("1d redistribute", lambda: da.redistribute(mesh, [Replicate()]).to_local(), a)
    meshes = ["1d"]

    if info.world_size == 4:
        mesh2 = init_device_mesh(dev, (2, 2), mesh_dim_names=("dp", "tp"))
        d2 = distribute_tensor(a, mesh2, [Shard(0), Shard(1)])
        checks.close("2d mul", lambda: (d2 * 2).full_tensor(), a * 2)
        checks.close("2d row sum", lambda: d2.sum(dim=1).full_tensor(), a.sum(dim=1))
        checks.close("2d redistribute",
                     lambda: d2.redistribute(mesh2, [Replicate(), Shard(1)]).full_tensor(), a)
        meshes.append("2d")

    members = list(range(max(1, info.world_size - 1)))
    sub = DeviceMesh(dev, members)  # collective: every rank creates it, members or not
    ds = distribute_tensor(a, sub, [Shard(0)])
    out = ds + 1
    checks.true("sub-mesh global shape", isinstance(out, DTensor) and out.shape == a.shape)
    if info.rank in members:
        coordinate = list(sub.get_coordinate() or ())
        checks.true("sub-mesh coordinate", coordinate == [members.index(info.rank)])
        checks.close("sub-mesh add", out.full_tensor, a + 1)
    else:  # non-participating: an empty local shard, no compute, no collective
        checks.true("sub-mesh non-participating coordinate", sub.get_coordinate() is None)
        checks.true("sub-mesh non-participating local", out.to_local().numel() == 0)
    meshes.append(f"sub{members}")
    return meshes


def main() -> int:
    info = init_distributed()
    checks = Checks(info)
    meshes = run(info, checks)
    status = "ok" if not checks.failed else f"FAILED {checks.failed}"
    print(f"smoke rank {info.rank}/{info.world_size} [{info.launcher} {info.backend} "
          f"{info.device}]: {checks.count} checks, {status}", flush=True)
    totals = torch.tensor([checks.count, len(checks.failed)], device=info.device)
    dist.all_reduce(totals)
    checks_total, failures = (int(x) for x in totals.tolist())
    if info.rank == 0:
        verdict = "PASS" if failures == 0 else "FAIL"
        print(f"smoke {verdict}: world_size={info.world_size} launcher={info.launcher} "
              f"backend={info.backend} meshes={','.join(meshes)} checks={checks_total} "
              f"failures={failures}", flush=True)
    dist.destroy_process_group()
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    exit_now(main())
