"""The C path above dispatch (``dtdispatch._native._function``) against its Python twin
(``dtdispatch._native.function``), and its reference counting.

Single process, world size 1 (gloo, file store). ``build_key`` must return equal keys from both;
every workload, run many times through the C handler after a warm-up, must leave the reference
counts of everything it touches, the GC object count, traced memory and the RSS where they were.
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
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import dtdispatch
from dtdispatch import _above as above
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch._native import function

_function = native.function_implementations().get("native")
pytestmark = pytest.mark.skipif(
    _function is None,
    reason=f"the C extension dtdispatch._native._function is not built: {native.FUNCTION_REASON}",
)

CALLS = 5_000  # the replay paths: a leaked reference per call moves a count by 5000
CALLS_SLOW = 1_000  # paths that run torch's stock path on every call
SLOW = {
    "negative entry (view)",
    "step-varying scalar",
    "step aside (autograd needed)",
    "replay (view of a temporary)",
}


@pytest.fixture(scope="module", autouse=True)
def _native_installed(mesh: DeviceMesh) -> None:
    dispatcher.install("native", above=True)


def _dt(mesh: DeviceMesh, placement: Any, shape: tuple[int, ...] = (8, 8)) -> Any:
    return dtdispatch.accelerate(distribute_tensor(torch.randn(shape), mesh, [placement]))


def test_build_key_matches_the_twin(mesh: DeviceMesh) -> None:
    x, r = _dt(mesh, Shard(0)), _dt(mesh, Replicate())
    r.requires_grad_()
    with torch.inference_mode():
        inf = _dt(mesh, Shard(0))
    flagged = []
    for conj, neg in ((True, False), (False, True), (True, True)):
        f = torch.Tensor._dtensor__new__(
            type(x), x._local_tensor.to(torch.complex64), x._spec, requires_grad=False
        )
        torch._C._set_conj(f, conj)
        torch._C._set_neg(f, neg)
        flagged.append(f)
    calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = [
        (torch.add, (x, x), {}),
        (torch.add, (x, 2), {"alpha": 2.0}),
        (torch.Tensor.mul, (x, True), {}),
        (torch.Tensor.view, (x, [4, 16]), {}),
        (torch.Tensor.__getitem__, (x, (slice(0, 2, None), Ellipsis, None)), {}),
        (torch.cat, ([x, x],), {"dim": 1}),
        (torch.Tensor.to, (x, torch.float64), {"non_blocking": False}),
        (torch.Tensor.relu, (r,), {}),  # requires grad: a reason under grad mode
        (torch.add, (x, torch.ones(8, 8)), {}),  # a plain tensor: a reason
        (torch.add, (x, 1 + 2j), {}),
        (torch.Tensor.add_, (inf, 1), {}),  # an inference tensor
        *((torch.Tensor.resolve_conj, (f,), {}) for f in flagged),  # conj/neg bits
    ]
    assert _function is not None
    function.configure(above.config())
    ambient = [(torch.float32, None), (torch.float64, None)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ambient.append(function.ambient())
    assert ambient[-1] == (torch.float32, (("cpu", torch.bfloat16),))
    keys = set()
    for grad in (False, True):
        for inference in (False, True):
            for default_dtype, autocast in ambient:
                for func, args, kwargs in calls:
                    state = (grad, inference, default_dtype, autocast)
                    twin = function.build_key(func, args, kwargs, *state)
                    ours = _function.build_key(func, args, kwargs, *state)
                    assert ours == twin, (func, args, kwargs, state)
                    if not isinstance(twin[0], str):
                        assert hash(tuple(ours[0])) == hash(tuple(twin[0]))
                        keys.add(tuple(twin[0]))
    # Every state and flag above is in the key: no two of these calls share one.
    assert len(keys) == sum(
        1
        for grad in (False, True)
        for _ in (False, True)
        for _ in ambient
        for _, args, _ in calls
        if not (grad and any(getattr(a, "requires_grad", False) for a in args))
        and not any(type(a) is torch.Tensor for a in args)
    )


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _workloads(mesh: DeviceMesh) -> dict[str, tuple[Callable[[], Any], list[Any]]]:
    x, r, inplace, out = (
        _dt(mesh, Shard(0)),
        _dt(mesh, Replicate()),
        _dt(mesh, Shard(0)),
        _dt(mesh, Shard(0)),
    )
    grad_x = _dt(mesh, Shard(0)).requires_grad_()
    x3 = _dt(mesh, Shard(0), (4, 3, 8))
    touched = [x, r, inplace, out, grad_x, x3, x._spec, r._spec, x3._spec, torch.float64]
    touched += [t._local_tensor for t in (x, r, inplace, out, x3)]
    step = [0]

    def varying() -> Any:
        step[0] += 1
        return x * (1.0 + step[0] * 1e-9)

    def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return fn()

        return run

    def autocast(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn()

        return run

    def inference(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return fn()

        return run

    with torch.inference_mode():
        inf = _dt(mesh, Shard(0))
    touched.append(inf)
    return {
        "replay (new output)": (no_grad(lambda: x + x), touched),
        "replay with a Python scalar": (no_grad(lambda: x * 2.5), touched),
        "replay with kwargs": (no_grad(lambda: torch.add(x, x, alpha=2)), touched),
        "replay of a tensor list": (no_grad(lambda: torch.cat([x, x], 1)), touched),
        "replay (structseq output)": (no_grad(lambda: r.max(dim=1)), touched),
        "replay in-place (version bump)": (no_grad(lambda: inplace.mul_(1.0)), touched),
        "replay with a local chunk (S0 + R)": (no_grad(lambda: x + r), touched),
        "replay out=": (no_grad(lambda: torch.add(x, x, out=out)), touched),
        "replay under autocast": (autocast(no_grad(lambda: x + x)), touched),
        "replay on an inference tensor": (inference(lambda: inf + inf), touched),
        "replay (view of a temporary)": (
            no_grad(lambda: torch.einsum("bsd,ed->bes", x3, r)),
            touched,
        ),
        "negative entry (view)": (no_grad(lambda: x.t()), touched),
        "step-varying scalar": (no_grad(varying), touched),
        "step aside (autograd needed)": (lambda: grad_x.relu(), touched),
        "pass-through (attribute read)": (lambda: (x.shape, x.dtype, x.requires_grad), touched),
    }


WORKLOADS = [
    "replay (new output)",
    "replay with a Python scalar",
    "replay with kwargs",
    "replay of a tensor list",
    "replay (structseq output)",
    "replay in-place (version bump)",
    "replay with a local chunk (S0 + R)",
    "replay out=",
    "replay under autocast",
    "replay on an inference tensor",
    "replay (view of a temporary)",
    "negative entry (view)",
    "step-varying scalar",
    "step aside (autograd needed)",
    "pass-through (attribute read)",
]


def _cache_objects() -> list[Any]:
    """The thread's cache, its containers, its entries and what the plans' output entries hold
    (specs, view ops and their arguments)."""
    tc = above.thread_cache()
    held: list[Any] = []

    def walk(o: Any) -> None:
        if type(o) is not int:  # small ints are shared: their counts move with anything
            held.append(o)
        if type(o) is tuple:
            for e in o:
                walk(e)

    for plan in tc.entries.values():
        if isinstance(plan, above.TorchFunctionPlan):
            walk(plan.out)
    return [tc, tc.entries, tc.per_func, tc.negative, tc.stepped_aside, *tc.entries.values(), *held]


@pytest.mark.parametrize("name", WORKLOADS)
def test_torch_function_leaves_nothing_behind(mesh: DeviceMesh, name: str) -> None:
    dispatcher.install("native", above=True)
    fn, touched = _workloads(mesh)[name]
    for _ in range(200):  # warm-up: plans, negative entries and pass-through funcs are written
        fn()
    hits_before = dtdispatch.stats()["above"]["hits"]
    watched = [*touched, *_cache_objects(), None, True, False]
    gc.collect()
    refs_before = [sys.getrefcount(o) for o in watched]
    objects_before = len(gc.get_objects())
    rss_before = _rss_bytes()
    tracemalloc.start()
    traced_before, _ = tracemalloc.get_traced_memory()
    n = CALLS_SLOW if name in SLOW else CALLS
    for _ in range(n):
        fn()
    gc.collect()
    traced_after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = _rss_bytes()
    objects_after = len(gc.get_objects())
    refs_after = [sys.getrefcount(o) for o in watched]
    moved = [
        (repr(o)[:80], b, a)
        for o, b, a in zip(watched, refs_before, refs_after, strict=True)
        if a != b
    ]
    assert not moved, f"{name}: reference counts changed over {n} calls: {moved}"
    assert objects_after - objects_before <= 50, (
        f"{name}: {objects_after - objects_before} GC objects left"
    )
    assert traced_after - traced_before < 64 * 1024, (
        f"{name}: {traced_after - traced_before} bytes traced"
    )
    assert rss_after - rss_before < 16 * 2**20, (
        f"{name}: RSS grew by {(rss_after - rss_before) / 2**20:.1f} MiB"
    )
    if name.startswith("replay"):
        # The workload really ran on the C replay path.
        assert dtdispatch.stats()["above"]["hits"] - hits_before == n
