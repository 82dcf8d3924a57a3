"""The harness from the inside: bodies run on real ranks with the default group initialized."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from dtdispatch.testing import current_rank, current_world_size, mesh_1d, mesh_2d, sub_mesh


def _device() -> str:
    """Where collectives of the default group run: "auto" picks nccl when there are enough GPUs."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


@pytest.mark.parametrize(
    "n", [pytest.param(n, marks=pytest.mark.distributed(world_size=n)) for n in (1, 2, 4)]
)
def test_ranks_see_one_group(rank: int, world_size: int, n: int) -> None:
    assert world_size == n == dist.get_world_size() == current_world_size()
    assert rank == dist.get_rank() == current_rank()
    assert torch.get_num_threads() == 1
    total = torch.tensor([rank], device=_device())
    dist.all_reduce(total)
    assert total.item() == n * (n - 1) // 2


@pytest.mark.distributed(world_size=2)
@pytest.mark.parametrize("value", [3, "text", (1.5, None)])
def test_parametrize_arguments_reach_every_rank(rank: int, world_size: int, value: object) -> None:
    seen: list[object] = [None] * world_size
    dist.all_gather_object(seen, value)
    assert seen == [value] * world_size


@pytest.mark.distributed(world_size=2)
def test_mesh_1d_spans_all_ranks_and_is_cached(rank: int, world_size: int) -> None:
    mesh = mesh_1d()
    assert mesh.device_type == _device()
    assert mesh.mesh.tolist() == [0, 1]
    assert tuple(mesh.get_coordinate() or ()) == (rank,)
    assert mesh_1d() is mesh
    x = distribute_tensor(torch.arange(4.0), mesh, [Shard(0)])
    assert x.to_local().tolist() == [2.0 * rank, 2.0 * rank + 1]
    assert (x * 2).full_tensor().tolist() == [0.0, 2.0, 4.0, 6.0]


@pytest.mark.distributed(world_size=4)
def test_mesh_2d_is_2x2(rank: int, world_size: int) -> None:
    mesh = mesh_2d()
    assert mesh.mesh.tolist() == [[0, 1], [2, 3]]
    assert mesh.mesh_dim_names == ("dp", "tp")
    assert tuple(mesh.get_coordinate() or ()) == (rank // 2, rank % 2)
    assert mesh_2d() is mesh
    full = torch.arange(16.0).reshape(4, 4)
    x = distribute_tensor(full, mesh, [Shard(0), Shard(1)])
    assert x.to_local().shape == (2, 2)
    assert torch.equal((x + 1).full_tensor(), full + 1)


@pytest.mark.distributed(world_size=4)
def test_sub_mesh_leaves_ranks_out(rank: int, world_size: int) -> None:
    mesh = sub_mesh((0, 1))
    assert mesh.mesh.tolist() == [0, 1]
    assert sub_mesh((0, 1)) is mesh
    full = torch.arange(6.0)
    out = distribute_tensor(full, mesh, [Shard(0)]) * 3
    assert isinstance(out, DTensor) and out.shape == (6,)
    if rank in (0, 1):
        assert tuple(mesh.get_coordinate() or ()) == (rank,)
        assert torch.equal(out.full_tensor(), full * 3)
    else:  # non-participating: a mesh object, no coordinate, an empty local shard
        assert mesh.get_coordinate() is None
        assert out.to_local().numel() == 0


@pytest.mark.distributed(world_size=2)
def test_mesh_helpers_reject_bad_arguments(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match="needs world size 4, got world size 2"):
        mesh_2d()
    for bad in [(), (0, 0), (0, 2), (-1,)]:
        with pytest.raises(ValueError, match=r"sub_mesh ranks .* got"):
            sub_mesh(bad)


@pytest.mark.distributed(world_size=2)
def test_pool_usable_after_a_skip(rank: int, world_size: int) -> None:
    t = torch.ones(1, device=_device())
    dist.all_reduce(t)
    assert t.item() == 2
