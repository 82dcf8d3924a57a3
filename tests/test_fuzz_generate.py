"""The fuzz program generator without ranks: reproducible from (seed, index), well-formed on meta
tensors, and rendered as a script that defines the same program."""

from __future__ import annotations

from typing import Any

import pytest

from dtdispatch.testing.fuzz import EXCLUSIONS, Program, generate, render


@pytest.mark.parametrize("world_size", [2, 4])
def test_generate_is_reproducible(world_size: int) -> None:
    impls = ["native", "python"]
    first = [generate(5, i, world_size=world_size, impls=impls) for i in range(20)]
    again = [generate(5, i, world_size=world_size, impls=impls) for i in range(20)]
    assert first == again
    assert len({p.lines for p in first}) == 20
    assert {p.impl for p in first} == set(impls)
    meshes = {p.mesh for p in first}
    assert "1d" in meshes and any(m.startswith("sub:") for m in meshes)
    assert ("2d" in meshes) == (world_size == 4)
    assert generate(6, 0, world_size=world_size, impls=impls) != first[0]


def test_render_defines_the_program() -> None:
    program = generate(5, 3, world_size=4, impls=["python"])
    source = render(program, world_size=4)
    namespace: dict[str, Any] = {"__name__": "repro"}
    exec(compile(source, "repro.py", "exec"), namespace)
    assert namespace["program"] == program
    assert isinstance(namespace["program"], Program)
    assert source.startswith("# torchrun --standalone --nproc-per-node 4 repro.py\n")


def test_exclusions_name_a_reason() -> None:
    for needle, exc_type, why in EXCLUSIONS:
        assert needle and exc_type.endswith("Error") and len(why) > 20
