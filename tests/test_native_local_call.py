"""``DispatchPlan.local_call``: the public torch function a plan may call instead of
``OpOverload._op``.

Single process, world size 1 (gloo, file store). Checked on both implementations: which plans get
a public function (and which must keep ``op_call``: the overload traps), that a hit really calls it,
that it never runs under a torch function mode, and that results are bitwise equal to stock DTensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import dtdispatch
from dtdispatch import FastDTensor, cache
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch.local_results import verified_local_call

aten = torch.ops.aten
VF = torch._C._VariableFunctions
IMPLS = sorted(native.implementations())


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest, mesh: DeviceMesh) -> Any:
    # The dispatch path under test; the path above it would take the no-autograd calls.
    dispatcher.install(request.param, above=False)
    dtdispatch.clear_cache()
    dtdispatch.reset_stats()
    yield request.param
    dispatcher.install(native.DEFAULT)


def _pair(mesh: DeviceMesh, placement: Any, shape: tuple[int, ...] = (8, 8), salt: int = 0) -> Any:
    """The same values as a stock DTensor and as a FastDTensor."""
    full = (torch.arange(float(torch.Size(shape).numel())) * 0.37 + salt).remainder(5.0) - 2.0
    stock = distribute_tensor(full.reshape(shape), mesh, [placement])
    return stock, dtdispatch.accelerate(stock)


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).tolist())


def _observable(t: Any) -> Any:
    if isinstance(t, DTensor):
        local = t._local_tensor
        return (
            tuple(t.placements),
            tuple(t.shape),
            tuple(local.shape),
            local.stride(),
            local.storage_offset(),
            t.dtype,
            t.requires_grad,
            _bits(local),
        )
    return (type(t).__name__, t)


def _plans(op: Any) -> list[cache.DispatchPlan]:
    return [plan for key, plan in cache.thread_cache().entries.items() if key[0] is op]


# name -> (call on (S0 tensor, Replicate tensor), the planned aten op, the expected public function)
CHOSEN: dict[str, tuple[Callable[[Any, Any], Any], Any, Any]] = {
    "add": (lambda x, r: x + x, aten.add.Tensor, VF.add),
    "mul": (lambda x, r: x * x, aten.mul.Tensor, VF.mul),
    "mul by a Python scalar (keyed by type)": (lambda x, r: x * 2.5, aten.mul.Tensor, VF.mul),
    "relu": (lambda x, r: torch.relu(x), aten.relu.default, VF.relu),
    "mm": (lambda x, r: torch.mm(x, r), aten.mm.default, VF.mm),
    "add Shard(0)+Replicate (local chunk)": (lambda x, r: x + r, aten.add.Tensor, VF.add),
    "view (rewritten local shape)": (
        lambda x, r: x.view(64),
        aten.view.default,
        torch._C.TensorBase.view,
    ),
    "t (view)": (lambda x, r: x.t(), aten.t.default, VF.t),
}


@pytest.mark.parametrize("name", sorted(CHOSEN))
def test_public_function_chosen_used_and_bitwise_equal_to_stock(
    mesh: DeviceMesh, impl: str, name: str
) -> None:
    fn, op, public = CHOSEN[name]
    stock_x, x = _pair(mesh, Shard(0))
    stock_r, r = _pair(mesh, Replicate(), salt=3)
    expected = _observable(fn(stock_x, stock_r))
    assert _observable(fn(x, r)) == expected  # the miss: the plan is written
    (plan,) = _plans(op)
    assert plan.fast and plan.local_call is public
    # A hit must call it: swap in a counting wrapper around the same function.
    calls = []

    def spy(*args: Any) -> Any:
        calls.append(len(args))
        return public(*args)

    (key,) = [k for k, p in cache.thread_cache().entries.items() if p is plan]
    cache.thread_cache().entries[key] = dataclasses.replace(plan, local_call=spy)
    for _ in range(2):
        assert _observable(fn(x, r)) == expected
    assert len(calls) == 2


def test_view_result_aliases_its_input_as_stock(mesh: DeviceMesh, impl: str) -> None:
    stock_x, x = _pair(mesh, Shard(0))
    for _ in range(2):  # miss, then hit through the public method
        v, stock_v = x.view(64), stock_x.view(64)
        assert v._local_tensor.untyped_storage().data_ptr() == x._local_tensor.data_ptr()
        assert v.untyped_storage()._cdata == x.untyped_storage()._cdata
        assert (v._is_view(), v._base is x) == (stock_v._is_view(), stock_v._base is stock_x)
    (plan,) = _plans(aten.view.default)
    assert plan.local_call is torch._C.TensorBase.view


# name -> call; each plan must keep op_call (local_call None) and match stock.
TRAPS: dict[str, Callable[[Any, Any], Any]] = {
    # torch.add(x, 2) would dispatch add.Tensor with a wrapped number, not add.Scalar
    "add.Scalar called directly": lambda x, r: aten.add.Scalar(x, 2),
    # sum.dim_IntList keys its dim by value: 1, 1.0 and True share a key, the parser reads each
    # differently
    "value-keyed int argument (sum over dim 1)": lambda x, r: x.sum(1),
    # a 0-dim tensor may parse as a Scalar depending on requires_grad, which no key holds
    "0-dim DTensor argument": lambda x, r: r.sum() * r.sum(),
    "kwargs (the key drops alpha)": lambda x, r: torch.add(x, x, alpha=2),
    "in-place": lambda x, r: x.clone().mul_(2.0),
}


@pytest.mark.parametrize("name", sorted(TRAPS))
def test_traps_keep_op_call(mesh: DeviceMesh, impl: str, name: str) -> None:
    fn = TRAPS[name]
    stock_x, x = _pair(mesh, Shard(0))
    stock_r, r = _pair(mesh, Replicate(), salt=3)
    for _ in range(3):  # miss, then hits
        assert _observable(fn(x, r)) == _observable(fn(stock_x, stock_r))
    ops = {
        "add.Scalar called directly": aten.add.Scalar,
        "value-keyed int argument (sum over dim 1)": aten.sum.dim_IntList,
        "0-dim DTensor argument": aten.mul.Tensor,
        "kwargs (the key drops alpha)": aten.add.Tensor,
        "in-place": aten.mul_.Tensor,
    }
    (plan,) = _plans(ops[name])
    assert plan.fast, plan.reason
    assert plan.local_call is None


def test_hit_with_kwargs_on_a_plan_without_them_calls_op_call(mesh: DeviceMesh, impl: str) -> None:
    """alpha is not in add's key: the plan written by ``x + x`` serves ``torch.add(x, x, alpha=2)``,
    whose kwargs the public function must not see."""
    stock_x, x = _pair(mesh, Shard(0))
    _ = x + x
    (plan,) = _plans(aten.add.Tensor)
    assert plan.local_call is VF.add
    assert _observable(torch.add(x, x, alpha=2)) == _observable(
        torch.add(stock_x, stock_x, alpha=2)
    )
    assert dtdispatch.stats()["per_op"]["aten.add.Tensor"]["hits"] >= 1


def test_verified_local_call_never_runs_a_seeded_op(mesh: DeviceMesh) -> None:
    """A seeded op (``nondeterministic_seeded``; the plan's caller leaves out only torch's DTensor
    random-op set) is never verified: the two verification calls would draw from the generator."""
    x = torch.rand(4, 4)
    state = torch.get_rng_state()
    assert verified_local_call(aten.bernoulli.default, aten.bernoulli.default, [x], None) is None
    assert torch.equal(torch.get_rng_state(), state)


def test_verified_local_call_rejects_a_different_overload(mesh: DeviceMesh) -> None:
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    assert verified_local_call(aten.add.Tensor, aten.add.Tensor, [x, y], None) is VF.add
    assert verified_local_call(aten.add.Tensor, aten.add.Tensor, [x, 2], None) is VF.add
    # the classic trap: torch.add(x, 2) runs add.Tensor, never add.Scalar
    assert verified_local_call(aten.add.Scalar, aten.add.Scalar, [x, 2], None) is None
    # a public function that decomposes (or runs another overload) is not the op
    assert verified_local_call(aten.sum.default, aten.sum.default, [x], None) is VF.sum
    assert verified_local_call(aten.addmm.default, aten.addmm.default, [x, x, x], None) is VF.addmm
    assert (
        verified_local_call(aten.mul.Tensor, aten.mul.Tensor, [x, torch.tensor(2.0)], None) is None
    )


def test_no_shortcut_planned_under_a_dispatch_mode(mesh: DeviceMesh) -> None:
    """The verification calls would show in a user's mode: plan without the shortcut instead."""

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[Any] = []

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    x, y = torch.randn(4, 4), torch.randn(4, 4)
    with Count() as mode:
        assert verified_local_call(aten.add.Tensor, aten.add.Tensor, [x, y], None) is None
    assert mode.seen == []


class _Record(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_torch_function_mode_sees_the_aten_op_not_the_public_function(
    mesh: DeviceMesh, impl: str
) -> None:
    """Under a torch function mode the hit calls ``op_call`` (what the mode saw before this
    shortcut existed), never the public function."""
    stock_x, x = _pair(mesh, Shard(0))
    _ = x + x
    (plan,) = _plans(aten.add.Tensor)
    assert plan.local_call is VF.add
    with _Record() as mode:
        # __torch_dispatch__ called directly: the mode stays active inside it
        out = FastDTensor.__torch_dispatch__(aten.add.Tensor, (FastDTensor,), (x, x), {})
    # (the mode also sees the wrap's ``requires_grad`` read, as before)
    assert aten.add.Tensor in mode.seen
    assert VF.add not in mode.seen
    assert _observable(out) == _observable(stock_x + stock_x)
    assert dtdispatch.stats()["per_op"]["aten.add.Tensor"]["hits"] == 1


class _Tagged(torch.Tensor):
    """A local tensor subclass with its own ``__torch_function__`` (as torchao's float8 weights)."""

    seen: ClassVar[list[Any]] = []

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_subclass_local_sees_the_aten_op_not_the_public_function(
    mesh: DeviceMesh, impl: str
) -> None:
    """The key holds specs, not the locals' types: a hit whose local is a tensor subclass calls
    ``op_call``, so its ``__torch_function__`` sees what it saw before this shortcut existed."""
    _, x = _pair(mesh, Shard(0))
    _ = x + x
    (plan,) = _plans(aten.add.Tensor)
    assert plan.local_call is VF.add
    tagged = x._local_tensor.as_subclass(_Tagged)
    y = torch.Tensor._dtensor__new__(FastDTensor, tagged, x._spec, requires_grad=False)
    _Tagged.seen.clear()
    out = y + y
    assert aten.add.Tensor in _Tagged.seen
    assert VF.add not in _Tagged.seen
    assert _bits(out._local_tensor) == _bits(x._local_tensor + x._local_tensor)
    assert dtdispatch.stats()["per_op"]["aten.add.Tensor"]["hits"] == 1


def test_autograd_forward_and_backward_bitwise_equal_to_stock(mesh: DeviceMesh, impl: str) -> None:
    results = []
    for make in (lambda t: t, dtdispatch.accelerate):
        stock_a, _ = _pair(mesh, Shard(0))
        stock_b, _ = _pair(mesh, Replicate(), salt=3)
        a = make(stock_a.detach().requires_grad_())
        b = make(stock_b.detach().requires_grad_())
        outs = []
        for _ in range(2):  # the second round replays the plans
            y = torch.relu(torch.mm(a * a + a, b)).t()
            y.sum().backward()
            outs.append((_observable(y), _observable(a.grad), _observable(b.grad)))
            a.grad = b.grad = None
        results.append(outs)
    assert results[0] == results[1]
    assert any(p.local_call is not None for p in cache.thread_cache().entries.values())


def test_unkeyed_scalar_is_not_pinned(mesh: DeviceMesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scalar below ``static_argnum`` is left out of the key (any type hits the plan), so even a
    type-keyed op's scalar there does not pin the parser's reading."""
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

    x = torch.randn(4, 4)
    assert verified_local_call(aten.mul.Tensor, aten.mul.Tensor, [x, 2.5], None) is VF.mul
    monkeypatch.setattr(cache, "schema_info", lambda op: RuntimeSchemaInfo(static_argnum=2))
    assert verified_local_call(aten.mul.Tensor, aten.mul.Tensor, [x, 2.5], None) is None
