"""Multi-process test harness for dtdispatch: a pytest plugin plus helpers for test bodies.

Mark a module-level test ``@pytest.mark.distributed(world_size=N)`` and give it the signature
``def test_x(rank, world_size, ...)``: its body runs on N live ranks with the default process group
initialized. The plugin (``dtdispatch.testing.plugin``) is registered through the ``pytest11`` entry
point. Inside a body, the helpers below build (cached) device meshes.
"""

from dtdispatch.testing import plugin
from dtdispatch.testing._meshes import current_rank, current_world_size, mesh_1d, mesh_2d, sub_mesh

__all__ = ["current_rank", "current_world_size", "mesh_1d", "mesh_2d", "plugin", "sub_mesh"]
