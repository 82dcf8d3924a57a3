"""Conformance from torch's OpInfo database (``dtdispatch.testing.opinfo``) on live ranks, world
sizes 1 and 2: each op on stock DTensor and on dtdispatch (both implementations, the path above
dispatch on and off, forward and backward), compared bitwise.

CI runs the fixed sample ``CI_OPS``; ``make opinfo`` (``DTDISPATCH_OPINFO=all``) runs the whole
database. ``DTDISPATCH_OPINFO_LOG=FILE`` appends each op's report (rank 0) to FILE.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate

from dtdispatch import FastDTensor
from dtdispatch import _native as native
from dtdispatch.testing import mesh_1d
from dtdispatch.testing.opinfo import run_op, selection

SELECTED = dict(selection())
TIMEOUT_S = float(os.environ.get("DTDISPATCH_OPINFO_TIMEOUT", 600))


def _worlds(*sizes: int) -> list[pytest.param]:  # type: ignore[valid-type]
    return [
        pytest.param(n, marks=pytest.mark.distributed(world_size=n, timeout=TIMEOUT_S),
                     id=f"ws{n}")
        for n in sizes
    ]


@pytest.mark.parametrize("op_id", list(SELECTED))
@pytest.mark.parametrize("n", _worlds(1, 2))
def test_opinfo(rank: int, world_size: int, n: int, op_id: str) -> None:
    report = run_op(op_id, mesh_1d(), **SELECTED[op_id])
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


class _Injected:
    """An OpInfo whose ``op`` is a test double: torch's samples of ``base``, float32 only."""

    variant_test_name = ""
    supports_autograd = True

    def __init__(self, name: str, base: str, fn: Callable[..., Any],
                 dtype: torch.dtype = torch.float32) -> None:
        from dtdispatch.testing.opinfo import _op_db

        self.name = name
        self.op = fn
        self._base = _op_db()[base]
        self._dtypes = {dtype}

    def supported_dtypes(self, device: str) -> set[torch.dtype]:
        return self._dtypes

    def supported_backward_dtypes(self, device: str) -> set[torch.dtype]:
        return self._dtypes

    def sample_inputs(self, *args: Any, **kwargs: Any) -> Any:
        return self._base.sample_inputs(*args, **kwargs)


def _if_fast(fast: Callable[..., Any], other: Callable[..., Any]) -> Callable[..., Any]:
    def fn(x: Any, *args: Any, **kwargs: Any) -> Any:
        return (fast if isinstance(x, FastDTensor) else other)(x)

    return fn


def _stock_raises_unhashable(fast: Callable[..., Any]) -> Callable[..., Any]:
    def fn(x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, FastDTensor):
            return fast(x)
        if isinstance(x, DTensor):
            raise RuntimeError("unhashable type: 'complex'")
        return x * 2

    return fn


def _mutate(x: Any) -> Any:
    out = x.neg()
    x.add_(1)
    return out


def _other_gradient(x: Any) -> Any:
    # The value is exactly -x (-2x + x is exact; the samples hold no zero, whose sign would
    # flip); the gradient is -2 instead of -1.
    return (x * 2).neg() - x.detach().neg()


# (name, fn, the failure message it must produce or "" for none, deviations expected)
INJECTED: list[tuple[str, Callable[..., Any], str, int]] = [
    ("same on both", torch.neg, "", 0),
    ("other values", _if_fast(lambda x: x.neg() + 1, torch.neg), "local bytes differ", 0),
    ("raises on dtdispatch only", _if_fast(lambda x: x.view(-3), torch.neg),
     "dtdispatch raised RuntimeError", 0),
    ("other placements",
     _if_fast(lambda x: x.neg().redistribute(x.device_mesh, [Replicate()]), torch.neg),
     "placements", 0),
    ("in-place on dtdispatch only", _if_fast(_mutate, torch.neg), "argument 0 after the call", 0),
    ("other gradient", _if_fast(_other_gradient, torch.neg), "backward", 0),
    ("stock raises unhashable, dtdispatch right", _stock_raises_unhashable(lambda x: x * 2), "", 2),
    ("stock raises unhashable, dtdispatch wrong", _stock_raises_unhashable(lambda x: x * 3),
     "stock raised RuntimeError", 0),
]


@pytest.mark.distributed(world_size=2, timeout=120)
def test_opinfo_catches_injected_differences(rank: int, world_size: int) -> None:
    """The checker itself: each injected difference from stock is a failure naming it; the same op
    on both sides and the declared deviation (checked against plain tensors) are not."""
    for name, fn, expected, deviations in INJECTED:
        # One configuration: the checker, not dtdispatch, is under test here.
        report = run_op(_Injected(name, "neg", fn), mesh_1d(), max_samples=1, max_shardings=2,
                        configs=[(native.DEFAULT, True)])
        messages = [f.message for f in report.unexpected()]
        if expected:
            assert messages and all(expected in m for m in messages), (name, messages)
        else:
            assert not messages, (name, messages)
        assert (report.counts["stock wrong, dtdispatch right"] > 0) == (deviations > 0), (
            name, report.counts)
