"""Suite-wide pytest set-up: pytester for the harness self-tests, and the dtdispatch plugin when
it is not installed (an installed dtdispatch registers it through its pytest11 entry point, and
registering it twice is an error)."""

import os
from collections.abc import Iterator
from importlib.metadata import entry_points

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def _entry_point_active() -> bool:
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "dtdispatch.testing.plugin" for ep in entry_points(group="pytest11"))


pytest_plugins = ["pytester"]
if not _entry_point_active():
    pytest_plugins.append("dtdispatch.testing.plugin")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceMesh]:
    """For single-process tests: a world-size-1 gloo group in this process (FileStore in a temp
    dir) and its 1-D cpu mesh; after the module the group is destroyed and the default
    implementation reinstalled."""
    from dtdispatch import _dispatcher as dispatcher
    from dtdispatch import _native as native

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    store = tmp_path_factory.mktemp("single_rank") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dispatcher.install(native.DEFAULT)
        dist.destroy_process_group()
