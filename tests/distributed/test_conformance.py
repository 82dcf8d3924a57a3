"""The conformance table on real ranks: every case on stock DTensor and on dtdispatch, compared
bitwise."""

from __future__ import annotations

import pytest

from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch.testing import mesh_1d, mesh_2d
from dtdispatch.testing.conformance import CASES, CASES_2D, run_case

IMPLS = sorted(native.implementations())
_BY_NAME = {case.name: case for case in CASES + CASES_2D}


def _worlds(*sizes: int) -> list[pytest.param]:  # type: ignore[valid-type]
    return [
        pytest.param(n, marks=pytest.mark.distributed(world_size=n, timeout=120), id=f"ws{n}")
        for n in sizes
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [c.name for c in CASES])
@pytest.mark.parametrize("n", _worlds(1, 2, 4))
def test_case_1d(rank: int, world_size: int, n: int, case: str, impl: str) -> None:
    dispatcher.install(impl)
    run_case(_BY_NAME[case], mesh_1d())
    # The second run replays the cached plan: it must agree with stock too.
    run_case(_BY_NAME[case], mesh_1d())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [c.name for c in CASES_2D])
@pytest.mark.distributed(world_size=4, timeout=120)
def test_case_2d(rank: int, world_size: int, case: str, impl: str) -> None:
    dispatcher.install(impl)
    run_case(_BY_NAME[case], mesh_2d())
    run_case(_BY_NAME[case], mesh_2d())
