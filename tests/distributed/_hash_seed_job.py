"""A two-rank job for tests/distributed/test_hash_seed.py, each rank started with its own
``PYTHONHASHSEED``: ops whose sharding strategy torch picks among equal-cost candidates in the
iteration order of a set of placements (``F.linear`` under inference mode with a Partial input, a
weight sharded on dim 1 and a Partial bias: a decomposed op's candidates), on stock DTensors and on
FastDTensors. Each rank checks the results against plain torch on the global values (small
integers: exact in any summation order) and prints "hash seed job ok"."""

import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Shard

import dtdispatch

# a deadlock (the ranks choosing different collectives) ends in gloo's timeout, not the test's
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (2,))
parts = [torch.arange(16.0).reshape(4, 2, 2) % 5 + r for r in range(2)]
weight = torch.arange(16.0).reshape(8, 2) % 3
biases = [torch.arange(8.0) % 4 - r for r in range(2)]
want = F.linear(sum(parts), weight, sum(biases))  # type: ignore[arg-type]
for accelerate in (False, True):
    x = DTensor.from_local(parts[rank], mesh, [Partial()])
    w = DTensor.from_local(weight[:, rank : rank + 1], mesh, [Shard(1)])
    b = DTensor.from_local(biases[rank], mesh, [Partial()])
    if accelerate:
        x, w, b = (dtdispatch.accelerate(t) for t in (x, w, b))
    with torch.inference_mode():
        got = F.linear(x, w, b).full_tensor()
    assert torch.equal(got, want), (accelerate, got, want)
dist.barrier()
print(f"hash seed job ok on rank {rank}", flush=True)
dist.destroy_process_group()
