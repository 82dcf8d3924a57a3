"""Views of a temporary on the path above dispatch (ARCHITECTURE "The path above dispatch"): a call
whose output is a view of a fresh tensor it made (F.linear on a 3-D input up to torch 2.14, einsum)
replays as that view, with stock's ``_base``, version counter and view metadata, outside inference
mode; a view of an argument, views sharing a base and views of a temporary written after the view
never replay. Both implementations, the path above dispatch on, real ranks, bitwise against stock
DTensor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard
from torch.overrides import handle_torch_function, has_torch_function_unary

import dtdispatch
from dtdispatch import FastDTensor

from ._compare import IMPLS, install, outcome, pair, same, same_outcome


def _values(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _above() -> dict[str, Any]:
    return dtdispatch.stats()["above"]  # type: ignore[no-any-return]


def _base(t: Any) -> Any:
    """``t._base``, read without entering dtdispatch."""
    with torch._C.DisableTorchFunctionSubclass():
        return t._base


def _same_view(got: Any, expected: Any, where: str) -> None:
    """``got`` is ``expected`` bitwise, a view as stock's is, of a base with stock's spec, local
    and version (the base a FastDTensor in the replay role)."""
    same(got, expected, where)
    assert got._is_view() and expected._is_view(), where
    base, stock_base = _base(got), _base(expected)
    assert type(base) is FastDTensor, (where, type(base))
    same(base, stock_base, f"{where} base")
    with torch._C.DisableTorchFunctionSubclass():
        assert (got._version, base._version) == (expected._version, stock_base._version), where


def _same_result(got: Any, expected: Any, where: str) -> None:
    """``got`` is ``expected`` bitwise, ``_is_view`` included, and a view as stock's is where
    stock's is one."""
    if expected._is_view():
        _same_view(got, expected, where)
    else:
        same(got, expected, where)


LINEAR_3D_VIEW = F.linear(torch.ones(2, 2, 2), torch.ones(2, 2), torch.ones(2))._is_view()
"""Whether this torch's F.linear on a 3-D input ends with a view of its addmm result (2.13, 2.14)
or returns a fresh tensor (2.15): stock DTensor's output is the same kind."""

PLACEMENTS = {"Shard(0)": Shard(0), "Shard(1)": Shard(1), "Replicate": Replicate()}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_linear_on_a_3d_input_replays_as_a_view(
    rank: int, world_size: int, impl: str, placement: str
) -> None:
    """F.linear on a 3-D input ends with a view of its addmm result (``LINEAR_3D_VIEW``): under
    no_grad the replay returns that view, a FastDTensor view of a FastDTensor base, both with
    stock's spec, stride and bytes; where torch returns a fresh tensor, the replay does too."""
    install(impl)
    sx, x = pair(_values(4, 3, 8), [PLACEMENTS[placement]])
    sw, w = pair(_values(6, 8, seed=1), [Replicate()])
    sb, b = pair(_values(6, seed=2), [Replicate()])
    dtdispatch.reset_stats()
    for step in range(3):
        with torch.no_grad():
            expected, got = F.linear(sx, sw, sb), F.linear(x, w, b)
        assert expected._is_view() == LINEAR_3D_VIEW, step
        _same_result(got, expected, f"step {step}")
    linear = _above()["per_func"]["linear"]
    assert linear == {"hits": 2, "misses": 1, "negative": 0}, linear


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_in_place_ops_on_a_replayed_view_match_stock(rank: int, world_size: int, impl: str) -> None:
    """The replayed view is a view made under no_grad, as stock's: an in-place op with a
    grad-requiring operand under grad mode raises stock's error; one under no_grad moves the
    view's and its base's version counters and values as on stock. Where F.linear's output is no
    view (``LINEAR_3D_VIEW``), the same ops act on a fresh tensor, as on stock."""
    install(impl)
    sx, x = pair(_values(4, 3, 8), [Shard(0)])
    sw, w = pair(_values(6, 8, seed=1), [Replicate()])
    sb, b = pair(_values(6, seed=2), [Replicate()])
    sg, g = pair(_values(4, 3, 6, seed=3), [Shard(0)], requires_grad=True)
    dtdispatch.reset_stats()
    for step in range(3):
        with torch.no_grad():
            expected, got = F.linear(sx, sw, sb), F.linear(x, w, b)
        same_outcome(outcome(got.add_, g), outcome(expected.add_, sg), f"step {step}")
        with torch.no_grad():
            expected.mul_(2.0)
            got.mul_(2.0)
        _same_result(got, expected, f"step {step} after mul_")
    assert _above()["per_func"]["linear"]["hits"] == 2, _above()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_a_view_made_under_grad_mode_without_grad_inputs_matches_stock(
    rank: int, world_size: int, impl: str
) -> None:
    """Under grad mode with no argument requiring grad the call replays too, and its view is one
    made under grad mode: an in-place op with a grad-requiring operand joins it to the graph, as
    on stock."""
    install(impl)
    sx, x = pair(_values(4, 3, 8), [Shard(0)])
    sw, w = pair(_values(6, 8, seed=1), [Replicate()])
    sg, g = pair(_values(4, 3, 6, seed=3), [Shard(0)], requires_grad=True)
    dtdispatch.reset_stats()
    for step in range(3):
        expected, got = torch.einsum("bsd,ed->bse", sx, sw), torch.einsum("bsd,ed->bse", x, w)
        _same_view(got, expected, f"step {step}")
        same_outcome(outcome(got.add_, g), outcome(expected.add_, sg), f"step {step}")
        assert type(got.grad_fn) is type(expected.grad_fn), (step, got.grad_fn, expected.grad_fn)
    assert _above()["per_func"]["einsum"]["hits"] == 2, _above()


COMPOSITES: dict[str, tuple[Callable[[Any, Any], Any], str]] = {
    "einsum bsd,ed->bse": (lambda x, w: torch.einsum("bsd,ed->bse", x, w), "einsum"),
    "einsum bsd,ed->bes": (lambda x, w: torch.einsum("bsd,ed->bes", x, w), "einsum"),
    "einsum bsd,ed->sbe": (lambda x, w: torch.einsum("bsd,ed->sbe", x, w), "einsum"),
    "tensordot": (lambda x, w: torch.tensordot(x, w, dims=([2], [1])), "tensordot"),
    "linear without bias": (lambda x, w: F.linear(x, w), "linear"),
    "matmul 3-D @ 2-D": (lambda x, w: torch.matmul(x, w), "_VariableFunctionsClass.matmul"),
}


@pytest.mark.parametrize("name", COMPOSITES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_composites_ending_in_a_view_replay(
    rank: int, world_size: int, impl: str, name: str
) -> None:
    """einsum and tensordot end in a chain of views of their bmm/mm result; linear without bias
    and matmul end in ``_unsafe_view`` (not a view): all replay, views as views."""
    install(impl)
    fn, func = COMPOSITES[name]
    sx, x = pair(_values(4, 3, 8), [Replicate()])
    sw, w = pair(_values(6, 8, seed=1), [Replicate()])
    if name == "matmul 3-D @ 2-D":
        sw, w = pair(_values(8, 6, seed=1), [Replicate()])
    dtdispatch.reset_stats()
    for step in range(3):
        with torch.no_grad():
            expected, got = fn(sx, sw), fn(x, w)
        _same_result(got, expected, f"{name} step {step}")
    counts = _above()["per_func"][func]
    assert counts == {"hits": 2, "misses": 1, "negative": 0}, (name, counts)


def _two_views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A user composite returning two views of one temporary."""
    if has_torch_function_unary(t):
        return handle_torch_function(_two_views, (t,), t)  # type: ignore[no-any-return]
    made = t * 2
    return made.t(), made.view(-1)


def _view_then_write(t: torch.Tensor) -> torch.Tensor:
    """A user composite that writes its temporary after taking the view it returns."""
    if has_torch_function_unary(t):
        return handle_torch_function(_view_then_write, (t,), t)  # type: ignore[no-any-return]
    made = t * 2
    view = made.t()
    made.add_(1.0)
    return view


REFUSED: dict[str, tuple[Callable[[Any], Any], str]] = {
    "transpose of the argument": (lambda x: x.t(), "view function"),
    "einsum permuting the argument": (lambda x: torch.einsum("ij->ji", x), "view output"),
    "two views of one temporary": (_two_views, "aliased outputs"),
    "a temporary written after its view": (_view_then_write, "output version"),
}


@pytest.mark.parametrize("name", REFUSED)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_views_a_replay_cannot_make_never_replay(
    rank: int, world_size: int, impl: str, name: str
) -> None:
    """A view of an argument (its base is the caller's tensor), views sharing one base (a replay
    wraps each output on its own) and a view whose temporary moved its version counter stay on
    the dispatch path, with stock's aliasing."""
    install(impl)
    fn, reason = REFUSED[name]
    func = getattr(fn, "__name__", "")
    sx, x = pair(_values(8, 8), [Shard(0)])
    dtdispatch.reset_stats()
    for step in range(3):
        with torch.no_grad():
            expected, got = fn(sx), fn(x)
        same(got, expected, f"{name} step {step}")
        pairs = (
            list(zip(got, expected, strict=True)) if isinstance(got, tuple) else [(got, expected)]
        )
        for g, e in pairs:
            assert g._is_view() == e._is_view(), (name, step)
            assert (_base(g) is x) == (_base(e) is sx), (name, step)
        if isinstance(got, tuple):
            assert (_base(got[0]) is _base(got[1])) == (_base(expected[0]) is _base(expected[1]))
            with torch.no_grad():
                expected[0].mul_(2.0)
                got[0].mul_(2.0)
            same(got, expected, f"{name} step {step} after mul_")
            assert got[1]._version == expected[1]._version, (name, step)
    if reason == "view function":  # stepped aside before any key, every time
        assert _above()["stepped_aside"] == {reason: 3} and _above()["negative"] == {}
        return
    negative = _above()["negative"]
    assert negative == {reason: 2}, (name, negative)
    if func != "<lambda>":
        counts = _above()["per_func"][func]
        assert counts == {"hits": 0, "misses": 1, "negative": 2}, (name, counts)


_LAYOUT_COMPOSITES: dict[str, Callable[[Any], Any]] = {
    "flatten": lambda t: t.flatten(),
    "reshape": lambda t: t.reshape(-1),
    "contiguous": lambda t: t.contiguous(),  # on the local: the argument itself
}


@pytest.mark.parametrize("name", _LAYOUT_COMPOSITES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_a_composite_that_copies_on_the_global_layout_never_aliases_its_argument(
    rank: int, world_size: int, impl: str, name: str
) -> None:
    """``flatten``/``reshape``/``contiguous`` branch on layout: stock reads the wrapper's global
    strides (not contiguous here: a copy), a replay would read the local's (a single column:
    contiguous, so a view of the argument or the argument itself). The call never replays: its
    output does not alias its argument, and an in-place op on it leaves the argument as on
    stock."""
    install(impl)
    fn = _LAYOUT_COMPOSITES[name]
    sx, x = pair(_values(2, 2 * world_size).t(), [Shard(1)])
    dtdispatch.reset_stats()
    for step in range(3):
        expected, got = fn(sx), fn(x)
        same(got, expected, f"{name} step {step}")
        with torch._C.DisableTorchFunctionSubclass():
            local, stock_local = got._local_tensor, expected._local_tensor
        assert local._is_view() == stock_local._is_view() is False, (name, step)
        with torch.no_grad():
            expected.add_(1.0)
            got.add_(1.0)
        same(got, expected, f"{name} step {step} after add_")
        same(x, sx, f"{name} step {step}: the argument after add_ on the output")
    reason = "rewritten arguments" if name == "reshape" else "replay differs"  # reshape's -1
    assert _above()["negative"] == {reason: 2}, _above()["negative"]
