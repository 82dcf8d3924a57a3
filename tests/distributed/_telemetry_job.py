"""A torchrun job for tests/distributed/test_telemetry.py: some dtdispatch work that differs per
rank, then its own ``dtdispatch.stats()`` written to ``OWN_DIR/own-rank{R}.json`` just before exit,
so the test can compare the exit-time telemetry file with what the rank saw itself.

Rank 0 destroys the process group before exit (the telemetry must then take the rank seen by
``accelerate``); rank 1 leaves it for the exit-time writer to read.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import dtdispatch

dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world_size,))
x = dtdispatch.accelerate(distribute_tensor(torch.ones(8, 8), mesh, [Shard(0)]))
for _ in range(3 + rank):  # one miss, then 2 + rank hits (above dispatch: no autograd needed)
    x = x + 1.0
for rows in range(1, 4 + 2 * rank):  # a new shape every time: all misses (no collective here)
    y = DTensor.from_local(torch.ones(rows, 4), mesh, [Shard(0)], run_check=False)
    (dtdispatch.accelerate(y) * 2.0).sum()
own = dtdispatch.stats()
if rank == 0:
    dist.destroy_process_group()
Path(os.environ["OWN_DIR"], f"own-rank{rank}.json").write_text(json.dumps(own))
sys.exit(0)
