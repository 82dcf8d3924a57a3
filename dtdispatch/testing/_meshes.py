"""Mesh helpers for distributed test bodies (they run inside a rank of the pool).

Meshes are cached per process: creating one calls ``new_group``, a collective that costs time.
The cache is tied to the default process group, so a new group (a restarted pool) starts empty.
Every helper must be called on all ranks in the same order, as with any collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

_cache: dict[tuple[Any, ...], DeviceMesh] = {}
_cache_group: list[Any] = [None]  # the default group the cached meshes belong to


def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("no default process group: call this inside a distributed test body")
    return dist


def current_rank() -> int:
    """This process's rank.

    Returns:
        The rank in the default process group.

    Raises:
        RuntimeError: no default process group (outside a distributed test body).
    """
    rank: int = _dist().get_rank()
    return rank


def current_world_size() -> int:
    """The number of ranks.

    Returns:
        The size of the default process group.

    Raises:
        RuntimeError: no default process group (outside a distributed test body).
    """
    size: int = _dist().get_world_size()
    return size


def _cached(key: tuple[Any, ...], make: Any) -> DeviceMesh:
    dist = _dist()
    if _cache_group[0] is not dist.group.WORLD:
        _cache.clear()
        _cache_group[0] = dist.group.WORLD
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


def _device_type() -> str:
    return "cuda" if _dist().get_backend() == "nccl" else "cpu"


def mesh_1d() -> DeviceMesh:
    """A 1-D mesh over all ranks, cached per rank process.

    Returns:
        The mesh; device type "cpu" under gloo, "cuda" under nccl.

    Raises:
        RuntimeError: no default process group (outside a distributed test body).
    """
    from torch.distributed.device_mesh import init_device_mesh

    size = current_world_size()
    return _cached(("1d", size), lambda: init_device_mesh(_device_type(), (size,)))


def mesh_2d() -> DeviceMesh:
    """A 2x2 mesh with dims ("dp", "tp"), cached per rank process.

    Returns:
        The mesh; device type as ``mesh_1d``'s.

    Raises:
        ValueError: the world size is not 4.
        RuntimeError: no default process group (outside a distributed test body).
    """
    from torch.distributed.device_mesh import init_device_mesh

    size = current_world_size()
    if size != 4:
        raise ValueError(f"mesh_2d() needs world size 4, got world size {size}")
    return _cached(
        ("2d",), lambda: init_device_mesh(_device_type(), (2, 2), mesh_dim_names=("dp", "tp"))
    )


def sub_mesh(ranks: Sequence[int] = (0, 1)) -> DeviceMesh:
    """A 1-D mesh over ``ranks`` only, cached per rank process; call it on every rank, including
    the left-out ones.

    Args:
        ranks: distinct ranks of the default group.

    Returns:
        The mesh; on a left-out ("non-participating") rank it exists but ``get_coordinate()`` is
        None. Device type as ``mesh_1d``'s.

    Raises:
        ValueError: ``ranks`` is empty, repeats a rank or names one outside the group.
        RuntimeError: no default process group (outside a distributed test body).
    """
    from torch.distributed.device_mesh import DeviceMesh

    size = current_world_size()
    members = tuple(ranks)
    if not members or len(set(members)) != len(members) or any(
        not isinstance(r, int) or not 0 <= r < size for r in members
    ):
        raise ValueError(
            f"sub_mesh ranks must be distinct ints in [0, {size}), got {ranks!r}"
        )
    return _cached(("sub", members), lambda: DeviceMesh(_device_type(), list(members)))
