"""Reference counting of the C hot path (``dtdispatch._native._dispatch``): many dispatches leave
nothing behind.

Single process, world size 1 (gloo, file store). Each workload runs through the native
implementation (after a warm-up that writes its plan), then: Python objects tracked by the GC,
memory traced by tracemalloc, the RSS, and the reference counts of every object a dispatch touches
(arguments, specs, the op, the plan, the cache, the counters) must be where they were (counts and
traced bytes: in at least one of two equal rounds, so a one-time release is not taken for a leak).
A missing Py_DECREF on any of those paths leaks one object per call, which the counts catch in both
rounds; a leaked tensor shows in the RSS (release builds have no sys.gettotalrefcount).
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.overrides import TorchFunctionMode

import dtdispatch
from dtdispatch import FastDTensor, cache
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native

_dispatch = native.implementations().get("native")
pytestmark = pytest.mark.skipif(
    _dispatch is None,
    reason=f"the C extension dtdispatch._native._dispatch is not built: {native.REASON}",
)

aten = torch.ops.aten
CALLS = 100_000  # the plain hit path
CALLS_OTHER = 10_000  # every other replayed path
CALLS_SLOW = 2_000  # paths that run the Python slow path on every call
SLOW = {"python-only plan (random)", "no key (slow path)"}


@pytest.fixture(scope="module", autouse=True)
def _native_installed(mesh: DeviceMesh) -> None:
    """Every test here measures the C path (conftest's ``mesh`` reinstalls the default after)."""
    dispatcher.install("native")


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Sub(torch.Tensor):
    pass


class _Passthrough(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _workloads(mesh: DeviceMesh) -> dict[str, tuple[Callable[[], Any], list[Any]]]:
    """name -> (one call, the objects whose reference counts must not move)."""

    def dt(placement: Any, shape: tuple[int, ...] = (8, 8)) -> Any:
        return dtdispatch.accelerate(distribute_tensor(torch.randn(shape), mesh, [placement]))

    x, r, inplace, out = dt(Shard(0)), dt(Replicate()), dt(Shard(0)), dt(Shard(0))
    scalar = torch.tensor(1.0)
    kwargs_dtype = torch.float64
    touched = [x, r, inplace, out, x._spec, r._spec, scalar, kwargs_dtype]
    touched += [t._local_tensor for t in (x, r, inplace, out)]
    mode = _Passthrough()
    # the plan of ``x + x`` (a public function) hit with a local whose type is a subclass
    sub = torch.Tensor._dtensor__new__(
        type(x), x._local_tensor.as_subclass(_Sub), x._spec, requires_grad=False
    )
    touched += [mode, sub, sub._local_tensor]

    def under_function_mode() -> Any:
        # __torch_dispatch__ called directly, so the mode is active inside it:
        # DispatchPlan.local_call is skipped and op_call runs
        with mode:
            return FastDTensor.__torch_dispatch__(aten.add.Tensor, (FastDTensor,), (x, x), {})

    return {
        "add (new output)": (lambda: x + x, touched),
        "mul by a Python scalar": (lambda: x * 2.5, touched),
        "mul by a 0-d plain tensor": (lambda: x * scalar, touched),
        "Shard + Replicate (local chunk)": (lambda: x + r, touched),
        "view (aliasing)": (lambda: x.view(64), touched),
        "t (view through a public function)": (lambda: x.t(), touched),
        "add under a torch function mode (op_call)": (under_function_mode, touched),
        "add on a tensor-subclass local (op_call)": (lambda: sub + sub, touched),
        "in-place": (lambda: inplace.mul_(1.0), touched),
        "out=": (lambda: torch.add(x, x, out=out), touched),
        "cat (tensor list)": (lambda: torch.cat([x, x], 0), touched),
        "_foreach_add (list result)": (lambda: torch._foreach_add([x, r], 1.0), touched),
        "layer_norm (tuple result)": (lambda: F.layer_norm(x, (8,)), touched),
        "kwargs (_to_copy)": (lambda: x.to(kwargs_dtype), touched),
        "sum with keepdim": (lambda: x.sum(0, keepdim=True), touched),
        "python-only plan (random)": (lambda: torch.rand_like(x), touched),
        "no key (slow path)": (lambda: x + torch.ones(8, 8), touched),
    }


WORKLOADS = [
    "add (new output)",
    "mul by a Python scalar",
    "mul by a 0-d plain tensor",
    "Shard + Replicate (local chunk)",
    "view (aliasing)",
    "t (view through a public function)",
    "add under a torch function mode (op_call)",
    "add on a tensor-subclass local (op_call)",
    "in-place",
    "out=",
    "cat (tensor list)",
    "_foreach_add (list result)",
    "layer_norm (tuple result)",
    "kwargs (_to_copy)",
    "sum with keepdim",
    "python-only plan (random)",
    "no key (slow path)",
]


def _plan_objects() -> list[Any]:
    tc = cache.thread_cache()
    return [
        tc,
        tc.entries,
        tc.per_op,
        *tc.entries.values(),
        *tc.per_op.values(),
        *tc.entries.keys(),
    ]


@pytest.mark.parametrize("name", WORKLOADS)
def test_dispatch_leaves_nothing_behind(mesh: DeviceMesh, name: str) -> None:
    dispatcher.install("native")
    fn, touched = _workloads(mesh)[name]
    n = CALLS if name == "add (new output)" else CALLS_SLOW if name in SLOW else CALLS_OTHER

    def call() -> None:
        try:
            fn()
        except (
            RuntimeError
        ) as exc:  # the mixed-tensor error of the "no key" workload, raised every call
            assert "mixed torch.Tensor and DTensor" in str(exc)

    for _ in range(200):  # warm-up: the plan is written, caches in torch and Python are filled
        call()
    ops = [
        aten.add.Tensor,
        aten.mul.Tensor,
        aten.view.default,
        aten.t.default,
        aten.mul_.Tensor,
        aten.add.out,
        aten.cat.default,
        aten._foreach_add.Scalar,
        aten.native_layer_norm.default,
        aten._to_copy.default,
        aten.sum.dim_IntList,
        aten.rand_like.default,
    ]
    # None / True / False / the output kinds: a leaked reference to a singleton or a small int shows
    # only here
    watched = [
        *touched,
        *ops,
        *_plan_objects(),
        None,
        True,
        False,
        cache.VIEW,
        cache.INPLACE,
        cache.OUT,
    ]
    gc.collect()
    refs = [[sys.getrefcount(o) for o in watched]]
    objects_before = len(gc.get_objects())
    rss_before = _rss_bytes()
    # NOTE: two equal rounds. A missing Py_DECREF (or Py_INCREF) on a dispatch path moves a count
    # (or the traced bytes) by one per call or per few calls, so in both rounds; a one-time event
    # (a cache in torch or Python filled or released once, an allocation by the harness's threads:
    # rank pools of earlier tests live in this process) shows in one round at most. A reference
    # count or the traced bytes must therefore stay put in at least one of the two rounds.
    grown = []
    tracemalloc.start()
    for _ in range(2):
        traced_before, _ = tracemalloc.get_traced_memory()
        for _ in range(n // 2):
            call()
        gc.collect()
        traced_after, _ = tracemalloc.get_traced_memory()
        grown.append(traced_after - traced_before)
        refs.append([sys.getrefcount(o) for o in watched])
    tracemalloc.stop()
    rss_after = _rss_bytes()
    objects_after = len(gc.get_objects())
    moved = [
        (repr(o)[:80], r0, r1, r2)
        for o, r0, r1, r2 in zip(watched, *refs, strict=True)
        if r1 != r0 and r2 != r1
    ]
    assert not moved, (
        f"{name}: reference counts changed in both rounds of {n // 2} calls "
        f"(object, before, after round 1, after round 2): {moved}"
    )
    assert objects_after - objects_before <= 50, (
        f"{name}: {objects_after - objects_before} GC objects left"
    )
    assert min(grown) < 32 * 1024, (
        f"{name}: {grown} bytes traced in each of two rounds of {n // 2} calls"
    )
    # A leaked 8x8 local tensor is >= 256 bytes of data plus its TensorImpl, per call.
    assert rss_after - rss_before < 16 * 2**20, (
        f"{name}: RSS grew by {(rss_after - rss_before) / 2**20:.1f} MiB"
    )
