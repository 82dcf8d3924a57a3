"""The path above dispatch (FastDTensor.__torch_function__; ARCHITECTURE "The path above dispatch")
on real ranks, both
implementations: which calls replay and which never do, in-place and version counters, view
aliasing, autograd, threads, cache-key adversarial pairs, step-varying scalars and telemetry. Every
result is compared with stock DTensor on the same inputs, bitwise."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard
from torch.overrides import handle_torch_function, has_torch_function_unary
from torch.utils._python_dispatch import TorchDispatchMode

import dtdispatch
from dtdispatch import FastDTensor
from dtdispatch import _above as above
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch.testing import sub_mesh

from ._compare import IMPLS, install, pair, same


def _fresh(impl: str) -> None:
    """``impl`` with the path above dispatch on, empty caches, zeroed counters, and the pass-through
    funcs that the tests read already learnt (so counts below are the calls under test)."""
    install(impl, above=True)
    _, fast = pair(torch.ones(4, 4), [Replicate()])
    fast.dim(), fast.size(1), fast.device, fast.shape, fast.stride(), fast.dtype
    fast.requires_grad, fast.is_conj(), fast.is_neg(), fast.is_inference(), fast._is_view()
    dtdispatch.reset_stats()


def _above() -> dict[str, Any]:
    return dtdispatch.stats()["above"]


def _values(seed: int = 0) -> torch.Tensor:
    return torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))


REPLAYED: dict[str, Callable[..., Any]] = {
    "add": lambda a, r: a + a,
    "mul by python float": lambda a, r: a * 2.5,
    "relu": lambda a, r: torch.relu(a),
    "sum": lambda a, r: a.sum(),
    "softmax": lambda a, r: F.softmax(a, -1),
    "mm S0 x R": lambda a, r: torch.mm(a, r),
    "linear (composite)": lambda a, r: F.linear(a, r),
    "max with indices (structseq)": lambda a, r: a.max(dim=1),
    "add R + R": lambda a, r: r + r,
    "add S0 + R (local chunk of R)": lambda a, r: a + r,
    "mul R * S0 (local chunk of R)": lambda a, r: torch.mul(r, a),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_calls_without_autograd_replay_on_locals(rank: int, world_size: int, impl: str) -> None:
    _fresh(impl)
    (sa, a), (sr, r) = pair(_values(0), [Shard(0)]), pair(_values(1), [Replicate()])
    with torch.no_grad():
        for name, fn in REPLAYED.items():
            expected = fn(sa, sr)
            for _ in range(3):  # miss, then two hits
                same(fn(a, r), expected)
            before = dtdispatch.stats()
            same(fn(a, r), expected)
            after = dtdispatch.stats()
            # A hit dispatches no aten op on a FastDTensor: the dispatch path counts nothing.
            assert (after["hits"], after["misses"]) == (before["hits"], before["misses"]), name
    s = _above()
    assert s["hits"] == 3 * len(REPLAYED) and s["misses"] == len(REPLAYED)
    assert s["negative"] == {} and s["implementation"] == (
        "native"
        if impl == "native" and ("native" in native.function_implementations())
        else "python"
    )


def _size_reading_composite(t: torch.Tensor) -> torch.Tensor:
    """A user composite that reads a (global) size before dispatching."""
    if has_torch_function_unary(t):
        return handle_torch_function(_size_reading_composite, (t,), t)  # type: ignore[no-any-return]
    return t * t.shape[0]


def _data_dependent(t: torch.Tensor) -> torch.Tensor:
    if has_torch_function_unary(t):
        return handle_torch_function(_data_dependent, (t,), t)  # type: ignore[no-any-return]
    return t * 2 if bool((t.sum() > 0).item()) else t * 3


NEVER: dict[str, tuple[Callable[..., Any], str]] = {
    # a view function: stepped aside before any key (its output is always the argument's view)
    "sharded view given a global shape": (lambda a, r: a.view(64), "view function"),
    "transpose (view)": (lambda a, r: a.t(), "view function"),
    "detach (shares storage)": (lambda a, r: a.detach(), "view function"),
    # a negative entry in the key's place
    "sharded reshape": (lambda a, r: a.reshape(4, 16), "rewritten arguments"),
    "transpose through einsum (view)": (
        lambda a, r: torch.einsum("ij->ji", a),
        "view output",
    ),
    "mm S0 x S0 (all-gather)": (lambda a, r: torch.mm(a, a), "redistribution"),
    "S0 + R + R (two ops, chunk)": (lambda a, r: torch.addcmul(a, r, r), "redistribution"),
    "composite reading a sharded size": (lambda a, r: _size_reading_composite(a), "replay differs"),
    "data-dependent branch": (lambda a, r: _data_dependent(r), "data-dependent"),
    "item (non-tensor output)": (lambda a, r: r[0, 0].item(), "view output"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_calls_that_never_replay(rank: int, world_size: int, impl: str) -> None:
    _fresh(impl)
    (sa, a), (sr, r) = pair(_values(0), [Shard(0)]), pair(_values(1), [Replicate()])
    with torch.no_grad():
        for name, (fn, reason) in NEVER.items():
            expected = fn(sa, sr)
            for _ in range(3):
                same(fn(a, r), expected)
            if reason == "view function":
                assert _above()["stepped_aside"].get(reason, 0) >= 3, (name, _above())
                continue
            entries = {v for v in above.thread_cache().entries.values() if isinstance(v, str)}
            assert reason in entries, (name, entries)
    s = _above()
    assert s["hits"] == 0
    keyed = [r for _, r in NEVER.values() if r != "view function"]
    assert sum(s["negative"].values()) >= 2 * len(keyed)
    assert s["stepped_aside"]["view function"] == 3 * (len(NEVER) - len(keyed))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_random_ops_never_replay_and_match_stock_under_seed(
    rank: int, world_size: int, impl: str
) -> None:
    _fresh(impl)
    sa, a = pair(_values(0), [Shard(0)])
    with torch.no_grad():
        for _ in range(3):
            torch.manual_seed(5)
            expected = (torch.rand_like(sa), F.dropout(sa, 0.5, training=True))
            torch.manual_seed(5)
            got = (torch.rand_like(a), F.dropout(a, 0.5, training=True))
            same(got, expected)
    assert _above()["hits"] == 0
    assert _above()["negative"].get("random op", 0) == 4


SEEDED_IN_INFERENCE: dict[str, Callable[[Any], Any]] = {
    "dropout": lambda t: F.dropout(t, 0.5, training=True),
    "alpha_dropout": lambda t: F.alpha_dropout(t, 0.5, training=True),
    "feature_alpha_dropout": lambda t: F.feature_alpha_dropout(t, 0.5, training=True),
}


@pytest.mark.parametrize("name", SEEDED_IN_INFERENCE)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_seeded_ops_outside_torchs_random_set_draw_as_stock(
    rank: int, world_size: int, impl: str, name: str
) -> None:
    """Under inference mode ``aten.dropout`` (and the alpha dropouts) reach DTensor whole: random
    (tagged ``nondeterministic_seeded``) but not in torch's DTensor random-op set. Neither the
    plan-time replay above dispatch nor the verification of a public local call may run them again:
    the generator must advance as on stock, so the next draw matches too."""
    _fresh(impl)
    fn = SEEDED_IN_INFERENCE[name]
    sa, a = pair(_values(0), [Replicate()])
    for step in range(3):
        with torch.inference_mode():
            torch.manual_seed(5)
            expected = (fn(sa), torch.rand(4))
            torch.manual_seed(5)
            got = (fn(a), torch.rand(4))
        same(got, expected, f"{name} step {step}")
    assert _above()["hits"] == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_plan_recorded_without_autograd_never_replays_with_autograd(
    rank: int, world_size: int, impl: str
) -> None:
    _fresh(impl)

    def step(w: Any, x: Any) -> Any:
        return F.softmax(torch.relu(F.linear(x, w)), -1).sum()

    sw, w = pair(_values(0), [Shard(0)])
    sx, x = pair(_values(1)[:4], [Replicate()])
    with torch.no_grad():
        for _ in range(2):
            same(step(w, x), step(sw, sx))
    hits = _above()["hits"]
    assert hits > 0
    sw.requires_grad_()
    w.requires_grad_()
    stock_loss, fast_loss = step(sw, sx), step(w, x)
    assert fast_loss.grad_fn is not None
    same(fast_loss, stock_loss)
    stock_loss.backward()
    fast_loss.backward()
    same(w.grad, sw.grad)
    s = _above()
    assert s["hits"] == hits  # nothing replayed where autograd was needed
    assert s["stepped_aside"].get("autograd needed", 0) >= 3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_in_place_returns_self_and_bumps_version_counters(
    rank: int, world_size: int, impl: str
) -> None:
    _fresh(impl)
    sx, x = pair(_values(0), [Shard(0)])
    sout, out = pair(torch.zeros(8, 8), [Shard(0)])
    with torch.no_grad():
        for step in range(4):
            assert sx.add_(1.5).mul_(0.5) is sx
            assert x.add_(1.5).mul_(0.5) is x
            assert torch.add(sx, sx, out=sout) is sout
            assert torch.add(x, x, out=out) is out
            torch._foreach_add_([sx, sout], 1.0)
            torch._foreach_add_([x, out], 1.0)
            same(x, sx)
            same(out, sout)
            assert (x._version, out._version) == (sx._version, sout._version), step
            assert x._local_tensor._version == sx._local_tensor._version, step
            assert out._local_tensor._version == sout._local_tensor._version, step
    assert _above()["hits"] >= 3 * 4 - 4 and _above()["negative"] == {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_view_outputs_keep_stock_aliasing(rank: int, world_size: int, impl: str) -> None:
    _fresh(impl)
    sx, x = pair(_values(0), [Replicate()])
    with torch.no_grad():
        for _ in range(3):
            sv, v = sx.t(), x.t()
            same(v, sv)
            assert v._is_view() == sv._is_view() and (v._base is x) == (sv._base is sx)
            sv.mul_(2.0)
            v.mul_(2.0)
            same(x, sx)
            assert x._version == sx._version and v._version == sv._version
    # The view is never replayed (a view function: stepped aside before any key); the in-place
    # op on it is (its counter is shared with the base).
    assert _above()["stepped_aside"] == {"view function": 3} and _above()["hits"] == 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_threads_have_their_own_caches(rank: int, world_size: int, impl: str) -> None:
    _fresh(impl)
    sa, a = pair(_values(0), [Shard(0)])
    expected = torch.relu(sa * 3.0)
    results: dict[int, list[Any]] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            with torch.no_grad():
                results[index] = [torch.relu(a * 3.0) for _ in range(20)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for outs in results.values():
        for out in outs:
            same(out, expected)
    s = _above()
    # Each thread misses once per func (its own cache), then hits.
    assert (s["misses"], s["hits"]) == (3 * 2, 3 * 2 * 19)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_cache_key_adversarial_pairs(rank: int, world_size: int, impl: str) -> None:
    """Two calls of one func that differ in one thing the result depends on: the second must not
    replay the first's plan (a distinct key, hence a miss), and both equal stock."""
    _fresh(impl)
    value = _values(0)
    s32, f32 = pair(value, [Shard(0)])
    s64, f64 = pair(value.double(), [Shard(0)])
    sint, fint = pair(torch.arange(64).reshape(8, 8), [Shard(0)])
    st_, ft_ = pair(value.t().contiguous().t(), [Shard(0)])  # same values, other strides
    srg, frg = pair(value, [Shard(0)])
    srg.requires_grad_()
    frg.requires_grad_()
    smesh, fmesh = pair(value, [Shard(0)], mesh=sub_mesh(ranks=(1, 0)))
    fast = {"f32": f32, "f64": f64, "int": fint, "strided": ft_, "rg": frg, "mesh": fmesh}
    stock = {"f32": s32, "f64": s64, "int": sint, "strided": st_, "rg": srg, "mesh": smesh}
    Call = Callable[[dict[str, Any]], Any]
    pairs: list[tuple[str, Call, Call]] = [
        ("dtype", lambda t: t["f32"] * 2, lambda t: t["f64"] * 2),
        ("stride", lambda t: t["f32"] + 1, lambda t: t["strided"] + 1),
        ("scalar type int vs float", lambda t: t["int"] * 2, lambda t: t["int"] * 2.0),
        ("scalar type int vs bool", lambda t: t["int"] + 1, lambda t: t["int"] + True),
        ("scalar value", lambda t: t["f32"].pow(2), lambda t: t["f32"].pow(3)),
        (
            "kwarg given vs defaulted",
            lambda t: torch.add(t["f32"], t["f32"]),
            lambda t: torch.add(t["f32"], t["f32"], alpha=2),
        ),
        ("keepdim", lambda t: t["f32"].sum(1), lambda t: t["f32"].sum(1, keepdim=True)),
        ("mesh", lambda t: t["f32"] * 3, lambda t: t["mesh"] * 3),
        ("requires_grad", lambda t: t["f32"].relu(), lambda t: t["rg"].relu()),
    ]
    with torch.no_grad():
        for name, first, second in pairs:
            dtdispatch.clear_cache()
            for _ in range(2):
                same(first(fast), first(stock))
            misses = _above()["misses"]
            same(second(fast), second(stock))
            assert _above()["misses"] == misses + 1, name
    # grad mode: a plan recorded under no_grad is not the plan of a call with grad mode on.
    dtdispatch.clear_cache()
    with torch.no_grad():
        same(f32 * 4, s32 * 4)
        same(f32 * 4, s32 * 4)
    misses = _above()["misses"]
    same(f32 * 4, s32 * 4)
    assert _above()["misses"] == misses + 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_step_varying_scalars_get_one_negative_entry(rank: int, world_size: int, impl: str) -> None:
    _fresh(impl)
    sx, x = pair(_values(0), [Shard(0)])
    steps = 30
    with torch.no_grad():
        for step in range(1, steps + 1):
            bias_correction = 1 - 0.999**step
            same(x / bias_correction, sx / bias_correction)
    s = _above()
    limit = above.STEP_VARYING_LIMIT
    assert s["misses"] == limit
    assert s["negative"] == {"step-varying scalar": steps - limit}
    assert s["entries"] == 1  # the per-value entries were dropped for the negative one
    # The same structure with a scalar of another type is another structure.
    with torch.no_grad():
        same(x / 2, sx / 2)
    assert _above()["misses"] == limit + 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_modes_and_attribute_reads_pass_through(rank: int, world_size: int, impl: str) -> None:
    _fresh(impl)
    sx, x = pair(_values(0), [Shard(0)])

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        for _ in range(3):
            mode = Count()
            with mode:
                same(x + 1, sx + 1)
            assert mode.ops >= 1  # the mode saw the aten op: the call was not replayed above it
            assert (x.shape, x.dtype, x.device, x.requires_grad, x.dim(), x.size(1)) == (
                sx.shape,
                sx.dtype,
                sx.device,
                sx.requires_grad,
                sx.dim(),
                sx.size(1),
            )
            assert x.placements == sx.placements
    s = _above()
    assert s["stepped_aside"] == {"mode or compiling": 3}
    assert s["hits"] == 0 and s["passthrough_funcs"] >= 5
    # Pass-through funcs are learnt once (one miss each), then never counted.
    misses = s["misses"]
    for _ in range(5):
        x.shape, x.dtype, x.size(1)
    assert _above()["misses"] == misses


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=1)
def test_capacity_bounds_the_cache_and_counts_evictions(
    rank: int, world_size: int, impl: str
) -> None:
    _fresh(impl)
    dtdispatch.set_cache_capacity(3)
    try:
        sx, x = pair(_values(0), [Shard(0)])
        with torch.no_grad():
            for exponent in (2, 3, 4, 5, 6):
                same(x.pow(exponent), sx.pow(exponent))
        s = _above()
        assert (s["misses"], s["entries"], s["evictions"]) == (5, 3, 2)
    finally:
        dtdispatch.set_cache_capacity(4096)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=4)
def test_non_participating_rank_never_replays(rank: int, world_size: int, impl: str) -> None:
    _fresh(impl)
    mesh = sub_mesh(ranks=(0, 1, 2))
    sx, x = pair(torch.arange(48, dtype=torch.float32).reshape(6, 8), [Shard(0)], mesh=mesh)
    with torch.no_grad():
        for _ in range(3):
            same(x * 2 + 1, sx * 2 + 1)
    s = _above()
    if rank == 3:
        assert s["hits"] == 0 and s["negative"].get("non-participating rank", 0) == 4
    else:
        assert s["hits"] == 4 and s["negative"] == {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_inference_mode_replays_like_stock(rank: int, world_size: int, impl: str) -> None:
    _fresh(impl)
    (sa, a), (sr, r) = pair(_values(0), [Shard(0)]), pair(_values(1), [Replicate()])
    with torch.inference_mode():
        for _ in range(3):
            expected, got = torch.mm(sa, sr) * 2, torch.mm(a, r) * 2
            same(got, expected)
            assert got.is_inference() == expected.is_inference()
            assert got._local_tensor.is_inference() == expected._local_tensor.is_inference()
    # The key holds the inference flag: the same call under no_grad is a new key.
    misses = _above()["misses"]
    with torch.no_grad():
        same(torch.mm(a, r), torch.mm(sa, sr))
    assert _above()["misses"] == misses + 1
    assert _above()["hits"] == 4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=1)
def test_the_path_above_dispatch_can_be_switched_off(rank: int, world_size: int, impl: str) -> None:
    dispatcher.install(impl, above=False)
    try:
        dtdispatch.clear_cache()
        dtdispatch.reset_stats()
        sx, x = pair(_values(0), [Shard(0)])
        with torch.no_grad():
            for _ in range(3):
                same(x + 1, sx + 1)
        s = dtdispatch.stats()
        assert s["above"]["implementation"] == "off"
        assert s["above"]["hits"] == s["above"]["misses"] == 0
        assert s["hits"] == 2  # the dispatch path took every call
        assert FastDTensor.__torch_function__ is torch._C._disabled_torch_function_impl
    finally:
        dispatcher.install(impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_local_chunk_replay_respects_explicit_redistribution(
    rank: int, world_size: int, impl: str
) -> None:
    from dtdispatch import _compat

    if _compat.ExplicitRedistributionContext is None:
        pytest.skip("this torch has no ExplicitRedistributionContext")
    _fresh(impl)
    (sa, a), (sr, r) = pair(_values(0), [Shard(0)]), pair(_values(1), [Replicate()])
    with torch.no_grad():
        for _ in range(2):
            same(a + r, sa + sr)
        assert _above()["hits"] == 1
        outcomes = []
        for x, y in ((sa, sr), (a, r)):
            try:
                with _compat.ExplicitRedistributionContext():
                    outcomes.append(("ok", x + y))
            except RuntimeError as exc:
                outcomes.append(("raised", str(exc)))
        assert outcomes[0][0] == outcomes[1][0]
        if outcomes[0][0] == "ok":
            same(outcomes[1][1], outcomes[0][1])
    assert _above()["stepped_aside"] == {"explicit redistribution context": 1}


# One call per name of _above's view functions, on an 8x8 Replicate FastDTensor.
VIEW_CALLS: dict[str, Callable[[Any], Any]] = {
    "t": lambda x: x.t(),
    "transpose": lambda x: torch.transpose(x, 0, 1),
    "permute": lambda x: x.permute(1, 0),
    "view": lambda x: x.view(8, 8),
    "view_as": lambda x: x.view_as(x),
    "unsqueeze": lambda x: torch.unsqueeze(x, 0),
    "squeeze": lambda x: x.squeeze(),
    "expand": lambda x: x.expand(8, 8),
    "expand_as": lambda x: x.expand_as(x),
    "narrow": lambda x: torch.narrow(x, 1, 0, 4),
    "select": lambda x: x.select(1, 0),
    "unflatten": lambda x: x.unflatten(1, (2, 4)),
    "movedim": lambda x: torch.movedim(x, 0, 1),
    "moveaxis": lambda x: x.moveaxis(0, 1),
    "swapaxes": lambda x: x.swapaxes(0, 1),
    "swapdims": lambda x: torch.swapdims(x, 0, 1),
    "diagonal": lambda x: x.diagonal(),
    "unfold": lambda x: x.unfold(1, 2, 2),
    "as_strided": lambda x: x.as_strided((4, 4), (8, 1)),
    "split": lambda x: x.split(4, 1),
    "split_with_sizes": lambda x: x.split_with_sizes([3, 5], 1),
    "chunk": lambda x: torch.chunk(x, 2, 1),
    "unbind": lambda x: x.unbind(1),
    "tensor_split": lambda x: x.tensor_split(2, 1),
    "adjoint": lambda x: x.adjoint(),
    "detach": lambda x: x.detach(),
    "T": lambda x: x.T,
    "mT": lambda x: x.mT,
    "H": lambda x: x.H,
    "mH": lambda x: x.mH,
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2)
def test_view_functions_return_views_and_step_aside(rank: int, world_size: int, impl: str) -> None:
    """The policy behind ``_above.view_functions``: each one's output (every element of a tuple)
    shares its FastDTensor argument's storage on stock, so a replay could never make it; dtdispatch
    steps aside for each before building a key, with stock's result and aliasing."""
    assert set(VIEW_CALLS) == set(above._VIEW_METHODS) | set(above._VIEW_PROPERTIES)
    _fresh(impl)
    sx, x = pair(_values(3), [Replicate()])
    taken = 0
    with torch.no_grad():
        for name, fn in VIEW_CALLS.items():
            outcome = []
            for t in (sx, x):
                try:
                    outcome.append(("ok", fn(t)))
                except Exception as error:  # as on stock: torch's own error, stepped aside too
                    outcome.append(("raised", type(error)))
            (kind, expected), (fast_kind, got) = outcome
            assert kind == fast_kind, (name, outcome)
            taken += 1
            if kind == "raised":
                assert got is expected, name
                continue
            same(got, expected, name)
            outs = got if isinstance(got, tuple) else (got,)
            for out in outs:
                assert out._local_tensor.untyped_storage().data_ptr() == (
                    x._local_tensor.untyped_storage().data_ptr()
                ), name
    s = _above()
    assert s["stepped_aside"] == {"view function": taken} and s["negative"] == {}, s
