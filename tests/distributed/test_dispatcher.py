"""The dispatch path (``dispatcher``) on real ranks: ranks outside the mesh, autograd, telemetry,
threads and the public API."""

from __future__ import annotations

import gc
import io
import threading
import weakref
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

import dtdispatch
from dtdispatch import FastDTensor, cache
from dtdispatch import _dispatcher as dispatcher
from dtdispatch.testing import mesh_1d, sub_mesh

from ._compare import IMPLS, install

aten = torch.ops.aten


class _KernelLog(TorchDispatchMode):
    """Records the ops that reach plain tensors (local kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.local_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not any(issubclass(t, DTensor) for t in types):
            self.local_ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=4)
def test_non_participating_rank(rank: int, world_size: int, impl: str) -> None:
    dispatcher.install(impl)
    mesh = sub_mesh(ranks=(0, 1, 2))
    participating = rank != 3
    value = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    stock_x = distribute_tensor(value, mesh, [Shard(0)])
    stock_y = distribute_tensor(value, mesh, [Replicate()])
    x, y = dtdispatch.accelerate(stock_x), dtdispatch.accelerate(stock_y)
    ops = [
        ("mm", lambda a, b: torch.mm(a, b)),  # S0 x R: no communication
        ("mm redistribute", lambda a, b: torch.mm(b, a)),  # R x S0: all-gather on participants
        ("sum", lambda a, b: a.sum()),  # 0-d output
        ("split", lambda a, b: torch.split(a, 4, dim=1)),  # tuple output
    ]
    for name, fn in ops:
        for _ in range(2):  # miss, then hit
            expected = fn(stock_x, stock_y)
            log = _KernelLog()
            with CommDebugMode() as comms, log:
                got = fn(x, y)
            results = got if isinstance(got, (tuple, list)) else (got,)
            stock = expected if isinstance(expected, (tuple, list)) else (expected,)
            for g, e in zip(results, stock, strict=False):
                assert isinstance(g, FastDTensor), name
                assert (
                    g.placements == e.placements and g.shape == e.shape and g.stride() == e.stride()
                ), name
                assert torch.equal(g._local_tensor, e._local_tensor), name
            if not participating:
                assert comms.get_total_counts() == 0, (name, comms.get_comm_counts())
                kernels = [
                    op
                    for op in log.local_ops
                    if not op.startswith(
                        ("aten.zeros", "aten.lift_fresh", "aten.empty", "aten.detach")
                    )
                ]
                assert kernels == [], (name, kernels)
                for g in results:
                    expected_local = (0,) if g.ndim else ()
                    assert tuple(g._local_tensor.shape) == expected_local, name
    per_op = dtdispatch.stats()["per_op"]
    if not participating:
        assert dtdispatch.stats()["bailouts"].get("non-participating", 0) >= 4
    assert per_op["aten.mm.default"]["hits"] >= 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_autograd_gradients_match_stock(rank: int, world_size: int, impl: str) -> None:
    dispatcher.install(impl)
    mesh = mesh_1d()
    gen = torch.Generator().manual_seed(0)
    w_value, x_value = torch.randn(8, 8, generator=gen), torch.randn(4, 8, generator=gen)

    def run(convert: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        w = convert(distribute_tensor(w_value, mesh, [Shard(0)]).requires_grad_())
        x = convert(distribute_tensor(x_value, mesh, [Replicate()]))
        loss = torch.relu(torch.nn.functional.linear(x, w)).softmax(-1).sum()
        loss.backward()
        return loss.full_tensor(), w.grad.full_tensor(), w.grad

    stock_loss, stock_grad, _ = run(lambda t: t)
    fast_loss, fast_grad, grad = run(lambda t: dtdispatch.accelerate(t.detach()).requires_grad_())
    assert torch.equal(stock_loss, fast_loss)
    assert torch.equal(stock_grad, fast_grad)
    assert isinstance(grad, DTensor) and grad.placements == (Shard(0),)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_telemetry_counts_what_happened(rank: int, world_size: int, impl: str) -> None:
    install(impl, above=False)  # counted below dispatch: the path above would take these calls
    x = dtdispatch.accelerate(distribute_tensor(torch.ones(8, 8), mesh_1d(), [Shard(0)]))
    x + x
    after_first = dtdispatch.stats()
    x + x
    x + x
    after = dtdispatch.stats()
    add = after["per_op"]["aten.add.Tensor"]
    assert after_first["misses"] == 1 and after_first["hits"] == 0
    assert add == {"hits": 2, "misses": 1, "bailouts": 1}  # the miss ran in Python
    assert after["hits"] == 2 and after["misses"] == 1 and after["entries"] == 1
    assert after["bailouts"] == {"miss": 1}
    assert after["implementation"] == impl
    # A plan only Python runs (here: a random op) is a hit plus a bailout counted by its reason.
    for _ in range(3):
        aten.native_dropout.default(x, 0.5, True)
    s = dtdispatch.stats()
    assert s["bailouts"] == {"miss": 2, "random": 2}
    assert s["per_op"]["aten.native_dropout.default"] == {"hits": 2, "misses": 1, "bailouts": 3}
    assert s["bailouts_per_op"] == {
        "aten.add.Tensor": {"miss": 1},
        "aten.native_dropout.default": {"miss": 1, "random": 2},
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=1)
def test_capacity_bounds_cache_and_counts_evictions(rank: int, world_size: int, impl: str) -> None:
    install(impl, above=False)  # counted below dispatch: the path above would take these calls
    dtdispatch.set_cache_capacity(3)
    try:
        x = dtdispatch.accelerate(distribute_tensor(torch.ones(8, 8), mesh_1d(), [Shard(0)]))
        rows = (1, 2, 4, 8, 16, 32)  # six distinct keys through a cache of three
        for n in rows:
            x.view(n, -1)
        s = dtdispatch.stats()
        assert (s["misses"], s["entries"], s["evictions"]) == (6, 3, 3)
        # Cached now: 8, 16, 32 (oldest first). A hit on 8 makes it the most recent, so the next
        # miss evicts 16, not 8.
        x.view(8, -1)
        assert (dtdispatch.stats()["hits"], dtdispatch.stats()["misses"]) == (1, 6)
        x.view(1, -1)
        x.view(8, -1)
        s = dtdispatch.stats()
        assert (s["hits"], s["misses"], s["entries"], s["evictions"]) == (2, 7, 3, 4)
        with pytest.raises(ValueError, match="positive int"):
            dtdispatch.set_cache_capacity(0)
    finally:
        dtdispatch.set_cache_capacity(4096)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=1)
def test_threads_have_separate_caches_freed_at_exit(rank: int, world_size: int, impl: str) -> None:
    install(impl, above=False)  # counted below dispatch: the path above would take these calls
    x = dtdispatch.accelerate(distribute_tensor(torch.ones(8, 8), mesh_1d(), [Shard(0)]))
    x * 2.0
    seen: dict[str, Any] = {}

    def worker() -> None:
        x * 2.0  # a miss here: this thread's cache is empty
        x * 2.0
        tc = cache.thread_cache()
        seen["ref"] = weakref.ref(tc)
        seen["entries"] = len(tc.entries)
        seen["main_is_other"] = tc is not main

    main = cache.thread_cache()
    t = threading.Thread(target=worker, name="worker-thread")
    t.start()
    t.join()
    gc.collect()
    assert seen["main_is_other"] and seen["entries"] == 1
    assert seen["ref"]() is None, "a finished thread's cache must be freed"
    s = dtdispatch.stats()
    mul = s["per_op"]["aten.mul.Tensor"]
    assert mul["misses"] == 2 and mul["hits"] == 1  # counts of the finished thread are kept
    assert s["bailouts_per_op"]["aten.mul.Tensor"] == {"miss": 2}  # its bailouts by reason too
    assert "worker-thread" not in s["threads"] and s["entries"] == 1


@pytest.mark.distributed(world_size=2)
def test_public_api_round_trips(rank: int, world_size: int) -> None:
    mesh = mesh_1d()
    stock = distribute_tensor(torch.arange(16.0).reshape(4, 4), mesh, [Shard(0)])
    fast = dtdispatch.accelerate(stock)
    assert isinstance(fast, FastDTensor) and isinstance(fast, DTensor)
    assert fast._local_tensor is stock._local_tensor  # zero-copy
    assert fast.placements == stock.placements and fast.device_mesh is stock.device_mesh
    assert torch.equal(fast.to_local(), stock.to_local())
    assert torch.equal(fast.full_tensor(), torch.arange(16.0).reshape(4, 4))
    replicated = fast.redistribute(mesh, [Replicate()])
    assert isinstance(replicated, FastDTensor) and replicated.placements == (Replicate(),)
    assert "FastDTensor(" in repr(fast)
    back = dtdispatch.to_torch(fast)
    assert type(back) is DTensor and back._local_tensor is stock._local_tensor
    from_local = FastDTensor.from_local(torch.ones(2, 4), mesh, [Shard(0)])
    assert isinstance(from_local, FastDTensor) and from_local.shape == (4, 4)
    with pytest.raises(TypeError, match=r"DTensor or an nn.Module"):
        dtdispatch.accelerate(torch.ones(2))

    model = torch.nn.Linear(4, 4)
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    parallelize_module(model, mesh, ColwiseParallel())
    model.weight.requires_grad_(False)
    dtdispatch.accelerate(model)
    assert type(model.weight) is torch.nn.Parameter or isinstance(model.weight, torch.nn.Parameter)
    assert isinstance(model.weight.data, FastDTensor) and model.weight.requires_grad is False
    assert model.bias.requires_grad is True

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded["weight"], FastDTensor)
    assert torch.equal(loaded["weight"].to_local(), model.weight.to_local())
    model.load_state_dict(loaded)
    dtdispatch.to_torch(model)
    assert type(model.weight.data) is DTensor
    dist.barrier()


@pytest.mark.distributed(world_size=1)
def test_native_status_reports_why(rank: int, world_size: int) -> None:
    active, reason = dtdispatch.native_status()
    assert isinstance(active, bool) and reason
    assert active == (dispatcher.active() == "native")


@pytest.mark.distributed(world_size=1)
def test_accelerate_without_subclass_dispatch(rank: int, world_size: int) -> None:
    """torch < 2.13 (``SUBCLASS_DISPATCH`` False): accelerate works while the path above dispatch
    is on; with it off there is nothing to run, so it warns once and leaves tensors stock. (On a
    real torch 2.11: tests/distributed/test_torch_versions.py under make compat.)"""
    import warnings

    from dtdispatch import _compat
    from dtdispatch import _dispatcher as dispatcher
    from dtdispatch import _native as native_pkg

    dispatcher.install(native_pkg.DEFAULT)  # ranks outlive tests: the path above dispatch on
    x = distribute_tensor(torch.ones(4), mesh_1d(), [Shard(0)])
    saved = _compat.SUBCLASS_DISPATCH
    _compat.SUBCLASS_DISPATCH = False  # what torch 2.11 gives
    try:
        assert isinstance(dtdispatch.accelerate(x), FastDTensor)
        dispatcher.install(native_pkg.DEFAULT, above=False)
        dtdispatch._warned_unsupported = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert dtdispatch.accelerate(x) is x
            assert dtdispatch.accelerate(x) is x
        assert len(caught) == 1
        assert "path above dispatch is off" in str(caught[0].message)
        assert "accelerate does nothing" in dtdispatch.native_status()[1]
    finally:
        _compat.SUBCLASS_DISPATCH = saved
        dispatcher.install(native_pkg.DEFAULT)
    assert "accelerate does nothing" not in dtdispatch.native_status()[1]
    assert isinstance(dtdispatch.accelerate(x), FastDTensor)
