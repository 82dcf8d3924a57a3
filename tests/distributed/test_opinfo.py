"""Conformance from torch's OpInfo database (``dtdispatch.testing.opinfo``) on live ranks, world
sizes 1 and 2: each op on stock DTensor and on dtdispatch (both implementations, the path above
dispatch on and off, forward and backward), compared bitwise.

CI runs the fixed sample ``CI_OPS``; ``make opinfo`` (``DTDISPATCH_OPINFO=all``) runs the whole
database. ``DTDISPATCH_OPINFO_LOG=FILE`` appends each op's report (rank 0) to FILE.
"""

from __future__ import annotations

import json
import os

import pytest

from dtdispatch.testing import mesh_1d
from dtdispatch.testing.opinfo import run_op, selection

OPS, OPTS = selection()
TIMEOUT_S = float(os.environ.get("DTDISPATCH_OPINFO_TIMEOUT", 600))


def _worlds(*sizes: int) -> list[pytest.param]:  # type: ignore[valid-type]
    return [
        pytest.param(n, marks=pytest.mark.distributed(world_size=n, timeout=TIMEOUT_S),
                     id=f"ws{n}")
        for n in sizes
    ]


@pytest.mark.parametrize("op_id", OPS)
@pytest.mark.parametrize("n", _worlds(1, 2))
def test_opinfo(rank: int, world_size: int, n: int, op_id: str) -> None:
    report = run_op(op_id, mesh_1d(), **OPTS)
    log = os.environ.get("DTDISPATCH_OPINFO_LOG")
    if log and rank == 0:
        with open(log, "a") as f:
            f.write(json.dumps({
                "op": op_id, "ws": world_size, "counts": dict(report.counts),
                "dtypes": sorted(str(d) for d in report.dtypes),
                "failures": [{"dtype": str(x.dtype), "where": x.where, "message": x.message,
                              "known": x.known.reason if x.known else None}
                             for x in report.failures],
                "deviations": report.deviations,
            }) + "\n")
    assert report.counts["samples"] + report.counts["sample not wrappable"] > 0, (
        f"{op_id}: no sample ran")
    unexpected = report.unexpected()
    assert not unexpected, report.summary()
