"""What the key above dispatch holds, and what it never replays (ARCHITECTURE 'What the key above
dispatch holds'): every ambient state and tensor flag that decides a call's result or what it
raises. Each test makes a plan under one state and calls again under another (and the reverse);
the result, or the exception, must be stock's. Both implementations, the path above dispatch on
and off, real ranks, bitwise against stock DTensor."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_unary

import dtdispatch
from dtdispatch import FastDTensor
from dtdispatch.testing import mesh_1d
from dtdispatch.testing._bits import bits

from ._compare import IDS, VARIANTS, install, outcome, pair, same, same_outcome


def _values(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _plain() -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _alternate(
    states: list[Callable[[], contextlib.AbstractContextManager[Any]]],
    fn: Callable[[Any], Any],
    stock_arg: Any,
    fast_arg: Any,
) -> None:
    """``fn`` under each state in turn, twice over (plans written under one state meet calls under
    the others), each time against stock under the same state."""
    for _ in range(2):
        for state in (*states, *reversed(states)):
            with state():
                expected = outcome(fn, stock_arg)
            with state():
                got = outcome(fn, fast_arg)
            same_outcome(got, expected)


# -- autocast -------------------------------------------------------------------------------


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_autocast_state_is_keyed(rank: int, world_size: int, impl: str, above: bool) -> None:
    install(impl, above)
    sx, x = pair(_values(4, 3, 8), [Shard(0)])
    sw, w = pair(_values(6, 8, seed=1), [Replicate()])
    states = [
        _plain,
        lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        lambda: torch.autocast("cpu", dtype=torch.float16),
        lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=False),
    ]
    with torch.no_grad():
        _alternate(states, lambda p: F.linear(p[0], p[1]), (sx, sw), (x, w))
        # The next op picks its placements from the output's spec: it must be stock's.
        _alternate(states, lambda p: torch.mm(p[0].flatten(0, 1), p[1].t()), (sx, sw), (x, w))


# -- default dtype ----------------------------------------------------------------------------


def _scaled(t: torch.Tensor) -> torch.Tensor:
    """A user composite with a factory inside: ``torch.tensor(2.5)`` takes the default dtype,
    and an integer tensor times it takes that dtype too."""
    if has_torch_function_unary(t):
        return handle_torch_function(_scaled, (t,), t)  # type: ignore[no-any-return]
    return t * torch.tensor(2.5)


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_default_dtype_is_keyed(rank: int, world_size: int, impl: str, above: bool) -> None:
    """A factory inside a composite takes the default dtype, and the output's spec with it.
    NOTE: compared with plain tensors: stock's output spec here depends on which default dtype
    torch's own caches saw first (they key a plain 0-d argument without its dtype), even with
    its sharding-propagation caches emptied."""
    install(impl, above)
    si, i = pair(torch.arange(64).reshape(8, 8), [Shard(0)])
    states = [_plain, lambda: _default_dtype(torch.float64), lambda: _default_dtype(torch.float16)]
    with torch.no_grad():
        for _ in range(2):
            for state in (*states, *reversed(states)):
                with state():
                    expected = _scaled(si._local_tensor)  # plain tensors
                    got = _scaled(i)
                assert isinstance(got, FastDTensor) and got.placements == si.placements
                assert got._spec.tensor_meta.dtype == expected.dtype
                assert got.dtype == expected.dtype
                local = got._local_tensor
                assert local.dtype == expected.dtype and local.stride() == expected.stride()
                assert torch.equal(bits(local), bits(expected))


# -- conj and neg bits --------------------------------------------------------------------------


def _flagged(t: Any, conj: bool, neg: bool) -> Any:
    """A wrapper of ``t``'s local (a copy) with its own conj/neg bits set.
    NOTE: set directly: stock DTensor raises NotImplementedError for ``_neg_view``."""
    out = torch.Tensor._dtensor__new__(
        type(t), t._local_tensor.clone(), t._spec, requires_grad=False
    )
    torch._C._set_conj(out, conj)
    torch._C._set_neg(out, neg)
    return out


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_conj_and_neg_bits_are_keyed(rank: int, world_size: int, impl: str, above: bool) -> None:
    """``resolve_conj``/``resolve_neg`` return the argument itself when its bit is clear, a new
    tensor when it is set: a plan made on one must not answer the other."""
    install(impl, above)
    sx, x = pair(_values(8, 8).to(torch.complex64), [Shard(0)])
    for conj, neg in ((True, False), (False, True), (True, True)):
        sf, f = _flagged(sx, conj, neg), _flagged(x, conj, neg)
        for fn in (lambda t: t.resolve_conj(), lambda t: t.resolve_neg(), lambda t: t * 2):
            for _ in range(2):
                for stock, fast in ((sx, x), (sf, f), (sx, x)):
                    with torch.no_grad():
                        expected, got = outcome(fn, stock), outcome(fn, fast)
                    same_outcome(got, expected)
                    if expected[0] == "ok":
                        assert (got[1] is fast) == (expected[1] is stock)


# -- inference tensors --------------------------------------------------------------------------


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_inference_tensors_are_keyed(rank: int, world_size: int, impl: str, above: bool) -> None:
    """In-place on an inference tensor outside inference mode raises on stock."""
    install(impl, above)
    pairs = [pair(_values(8, 8), [Shard(0)])]
    with torch.inference_mode():
        pairs.append(pair(_values(8, 8), [Shard(0)]))
    assert pairs[1][0].is_inference() and pairs[1][1].is_inference()
    for _ in range(2):
        for grad in (False, True):
            for stock, fast in (*pairs, *reversed(pairs)):
                with torch.set_grad_enabled(grad):
                    for fn in (
                        lambda t: t.mul_(1.5),
                        lambda t: t.add_(t),
                        lambda t: t * 2,
                        lambda t: torch.add(t, t, out=t),
                    ):
                        expected = outcome(fn, stock)
                        same_outcome(outcome(fn, fast), expected)


# -- views made under no_grad -------------------------------------------------------------------

NO_GRAD_VIEWS: dict[str, Callable[[Any, Any], Any]] = {
    "linear 3-D": lambda x, w: F.linear(x, w),
    "einsum bsd,ed->bse": lambda x, w: torch.einsum("bsd,ed->bse", x, w),
    "einsum bsd,ed->bes": lambda x, w: torch.einsum("bsd,ed->bes", x, w),
    "matmul 3-D": lambda x, w: torch.matmul(x, w.t()),
}


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_views_made_under_no_grad_match_stock(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    """A view made under no_grad (F.linear's 3-D output is a view of its addmm result) makes a
    later in-place op with a grad-requiring operand raise; a fresh tensor would join the graph."""
    install(impl, above)
    sx, x = pair(_values(4, 3, 8), [Replicate()])
    sw, w = pair(_values(6, 8, seed=1), [Replicate()])
    sg, g = pair(_values(4, 3, 6, seed=2), [Replicate()], requires_grad=True)
    for name, fn in NO_GRAD_VIEWS.items():
        for _ in range(3):
            with torch.no_grad():
                expected, got = fn(sx, sw), fn(x, w)
            same(got, expected)
            assert got._is_view() == expected._is_view(), name
            same_outcome(outcome(got.add_, g), outcome(expected.add_, sg))


# -- autograd entry points ----------------------------------------------------------------------


def _graph(a: Any, w: Any) -> Any:
    return (a * w).relu().sum()


ENTRY_POINTS: dict[str, Callable[[Any, Any], Any]] = {
    "Tensor.backward": lambda loss, w: loss.backward(),
    "autograd.backward": lambda loss, w: torch.autograd.backward([loss]),
    "autograd.grad": lambda loss, w: torch.autograd.grad(loss, [w]),
    "backward retaining the graph, twice": lambda loss, w: (
        loss.backward(retain_graph=True),
        loss.backward(),
    ),
}


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_autograd_entry_points_under_no_grad_match_stock(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    """Backward and grad called with grad mode off run the engine as stock does, every time."""
    install(impl, above)
    sa, a = pair(_values(8, 8), [Shard(0)])
    for name, fn in ENTRY_POINTS.items():
        sw, w = pair(_values(8, 8, seed=1), [Shard(0)], requires_grad=True)
        for _ in range(3):
            stock_loss, fast_loss = _graph(sa, sw), _graph(a, w)
            with torch.no_grad():
                expected, got = outcome(fn, stock_loss, sw), outcome(fn, fast_loss, w)
            same_outcome(got, expected)
            assert (w.grad is None) == (sw.grad is None), name
            if sw.grad is not None:
                same(w.grad, sw.grad)
    per_func = dtdispatch.stats()["above"]["per_func"]
    assert not any(v["hits"] for k, v in per_func.items() if "backward" in k or k == "grad")


AUTOGRAD_STATE: dict[str, Callable[[Any], Any]] = {
    "requires_grad_": lambda t: t.requires_grad_(),
    "requires_grad_(False)": lambda t: t.requires_grad_(False),
    "detach_": lambda t: t.detach_(),
    "retain_grad": lambda t: t.retain_grad(),
    "register_hook": lambda t: t.register_hook(lambda g: g * 2).remove(),
}


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_calls_that_change_autograd_state_match_stock(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    """Called with grad mode off, on leaves and non-leaves, repeatedly: stock's autograd state."""
    install(impl, above)
    for name, fn in AUTOGRAD_STATE.items():
        for _ in range(3):
            for leaf in (True, False):
                sw, w = pair(_values(8, 8, seed=1), [Shard(0)], requires_grad=True)
                if not leaf:
                    sw, w = sw * 2, w * 2
                with torch.no_grad():
                    same_outcome(outcome(fn, w), outcome(fn, sw))
                assert w.requires_grad == sw.requires_grad and w.is_leaf == sw.is_leaf, name
                assert (w.grad_fn is None) == (sw.grad_fn is None), name
                assert w.retains_grad == sw.retains_grad, name
                if w.requires_grad:
                    (w * 3).sum().backward()
                    (sw * 3).sum().backward()
                    assert (w.grad is None) == (sw.grad is None), name
                    if sw.grad is not None:
                        same(w.grad, sw.grad)


LAYOUTS = ["plain in and out", "sequence parallel, DTensor out"]


def _mlp(mesh: Any, accelerate: bool, layout: str) -> torch.nn.Module:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    if layout == LAYOUTS[0]:
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    else:
        plan = {
            "0": ColwiseParallel(input_layouts=Shard(1)),
            "2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        }
    parallelize_module(model, mesh, plan)
    if accelerate:
        dtdispatch.accelerate(model)
    return model


def _input(layout: str, rank: int, world_size: int, seed: int) -> torch.Tensor:
    x = _values(4, 4, 8, seed=seed)
    if layout != LAYOUTS[0]:
        x = x.chunk(world_size, 1)[rank].contiguous()
    return x


def _same_grads(fast: torch.nn.Module, stock: torch.nn.Module) -> None:
    for (name, sp), (_, fp) in zip(stock.named_parameters(), fast.named_parameters(), strict=True):
        assert sp.grad is not None and fp.grad is not None, name
        same(fp.grad, sp.grad)


def _loss(out: Any) -> Any:
    return out.square().sum()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_reentrant_checkpointing_matches_stock(
    rank: int, world_size: int, impl: str, above: bool, layout: str
) -> None:
    """checkpoint(use_reentrant=True) on a Colwise/Rowwise block: forward under no_grad, then in
    backward the recomputation and a nested backward with grad mode off; forward, input and
    parameter grads bitwise."""
    from torch.utils.checkpoint import checkpoint

    install(impl, above)
    stock, fast = _mlp(mesh_1d(), False, layout), _mlp(mesh_1d(), True, layout)
    for step in range(3):
        x = _input(layout, rank, world_size, 10 + step)
        sx, fx = x.clone().requires_grad_(), x.clone().requires_grad_()
        sout = checkpoint(stock, sx, use_reentrant=True)
        fout = checkpoint(fast, fx, use_reentrant=True)
        same(fout, sout)
        _loss(sout).backward()
        _loss(fout).backward()
        assert sx.grad is not None and fx.grad is not None
        same(fx.grad, sx.grad)
        _same_grads(fast, stock)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_backward_under_no_grad_through_a_tp_block_matches_stock(
    rank: int, world_size: int, impl: str, above: bool, layout: str
) -> None:
    install(impl, above)
    stock, fast = _mlp(mesh_1d(), False, layout), _mlp(mesh_1d(), True, layout)
    for step in range(3):
        x = _input(layout, rank, world_size, 20 + step)
        sloss, floss = _loss(stock(x)), _loss(fast(x))
        with torch.no_grad():
            sloss.backward()
            floss.backward()
        _same_grads(fast, stock)


def _keep_grad(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A user composite that sets a gradient: autograd state no replay on the locals would set."""
    if has_torch_function((t, g)):
        return handle_torch_function(_keep_grad, (t, g), t, g)  # type: ignore[no-any-return]
    t.grad = g
    return g * 2


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_composites_that_change_autograd_state_never_replay(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    install(impl, above)
    for _ in range(3):
        sw, w = pair(_values(8, 8), [Shard(0)], requires_grad=True)
        sg, g = pair(_values(8, 8, seed=1), [Shard(0)])
        with torch.no_grad():
            same(_keep_grad(w, g), _keep_grad(sw, sg))
        assert w.grad is g and sw.grad is sg


def _by_requires_grad(t: torch.Tensor) -> torch.Tensor:
    """A user composite that branches on ``requires_grad`` (as torch's checkpoint does)."""
    if has_torch_function_unary(t):
        return handle_torch_function(_by_requires_grad, (t,), t)  # type: ignore[no-any-return]
    return t * 2 if t.requires_grad else t * 3


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_requires_grad_is_keyed(rank: int, world_size: int, impl: str, above: bool) -> None:
    """With grad mode off a grad-requiring argument replays, so its flag must be in the key: a
    composite may read it."""
    install(impl, above)
    pairs = [pair(_values(8, 8), [Shard(0)]), pair(_values(8, 8), [Shard(0)], requires_grad=True)]
    with torch.no_grad():
        for _ in range(2):
            for stock, fast in (*pairs, *reversed(pairs)):
                same(_by_requires_grad(fast), _by_requires_grad(stock))


# -- comparisons across the two roles -------------------------------------------------------


@pytest.mark.distributed(world_size=2)
def test_a_comparison_across_roles_keeps_the_left_operands_layout(
    rank: int, world_size: int
) -> None:
    """``a > b`` with ``a`` in the replay role and ``b`` in the autograd role runs as ``a > b``
    (Python would run ``b < a`` first were b's type a subclass of a's): the output's strides
    follow ``a``'s column-major layout, as stock's do. ``isinstance`` still sees both roles as
    FastDTensors."""
    install("native")
    values = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    sa, a = pair(values.t().contiguous().t(), [Replicate()])  # column-major
    sleaf, leaf = pair(values + 1, [Replicate()], requires_grad=True)
    # made under grad mode from a tensor that requires grad: the autograd role
    sb, b = (t.redistribute(t.device_mesh, t.placements) for t in (sleaf, leaf))
    assert type(a) is FastDTensor and type(b) is not FastDTensor
    assert isinstance(b, FastDTensor) and issubclass(type(b), FastDTensor)
    same(a > b, sa > sb)
    same(b < a, sb < sa)


@pytest.mark.parametrize("impl", ["native", "python"])
@pytest.mark.distributed(world_size=2)
def test_the_output_role_does_not_depend_on_argument_order(
    rank: int, world_size: int, impl: str
) -> None:
    """The roles are siblings, so torch dispatches to whichever comes first; the output's role
    is read from the arguments: under grad mode an op with an argument in the autograd role makes
    an autograd-role output whichever side it is on (training activations stay out of the
    handler), and a no-grad op mixing roles makes a replay-role one."""
    install(impl)
    values = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    _, a = pair(values, [Replicate()])
    _, leaf = pair(values + 1, [Replicate()], requires_grad=True)
    b = leaf.redistribute(leaf.device_mesh, leaf.placements)
    assert type(a) is FastDTensor and type(b) is not FastDTensor
    # list elements count as arguments (torch.cat's tensor list)
    for out in (a * b, b * a, torch.cat([a, b]), torch.cat([b, a])):
        assert type(out) is type(b), type(out)
    with torch.no_grad():
        for out in (a * b, b * a, torch.cat([a, b]), torch.cat([b, a])):
            assert type(out) is FastDTensor, type(out)
        # every DTensor argument in the autograd role (an optimizer's foreach list)
        for out in (b * b, torch.cat([b, b]), *torch._foreach_mul([b, b], 2.0)):
            assert type(out) is type(b), type(out)
