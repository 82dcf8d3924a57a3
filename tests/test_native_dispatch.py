"""The C hot path (``dtdispatch._native._dispatch``) against its Python twin
(``dtdispatch._native.dispatch``).

Single process, world size 1 (gloo, file store), 1-D cpu mesh. Two properties, generated with
hypothesis:

- ``build_key``: for any argument structure, the C key equals the twin's key (``==`` and the same
  hash), None included. Both implementations read and write the same ThreadCache entries, so this is
  what lets them share plans.
- ``dispatch``: the same calls through ``install("native")`` and ``install("python")`` give
  bitwise-equal local tensors, the same placements and result types, the same effects on in-place /
  ``out=`` arguments, the same exceptions, and the same telemetry deltas (hits, misses, bailouts by
  reason, per op).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import dtdispatch
from dtdispatch import FastDTensor, cache
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch._native import dispatch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_dispatch = native.implementations().get("native")
pytestmark = pytest.mark.skipif(
    _dispatch is None,
    reason=f"the C extension dtdispatch._native._dispatch is not built: {native.REASON}",
)

aten = torch.ops.aten


# --------------------------------------------------------------------------------------------------
# Recipes: hypothesis draws descriptions; ``make`` turns one into fresh objects (in-place ops mutate
# their inputs, so every run materializes its own).
# --------------------------------------------------------------------------------------------------

FLOATS = [torch.float32, torch.float64, torch.bfloat16]
DTYPES = [*FLOATS, torch.int64]


def _values(shape: tuple[int, ...], dtype: torch.dtype, salt: int) -> torch.Tensor:
    n = math.prod(shape)
    base = (torch.arange(n, dtype=torch.float64) * 0.37 + salt * 0.11).remainder(5.0) - 2.0
    return base.reshape(shape).to(dtype)


def make(recipe: Any, mesh: DeviceMesh) -> Any:
    """Materialize a recipe: ("dt", shape, dtype, placement, salt), ("t", shape, dtype, salt) (a
    plain tensor), ("list", [...]), ("tuple", [...]), ("lit", value)."""
    tag = recipe[0]
    if tag == "dt":
        _, shape, dtype, placement, salt = recipe
        full = _values(shape, dtype, salt)
        return dtdispatch.accelerate(distribute_tensor(full, mesh, [placement]))
    if tag == "t":
        _, shape, dtype, salt = recipe
        return _values(shape, dtype, salt)
    if tag == "list":
        return [make(r, mesh) for r in recipe[1]]
    if tag == "tuple":
        return tuple(make(r, mesh) for r in recipe[1])
    if tag == "lit":
        return recipe[1]
    raise AssertionError(recipe)


def make_call(
    call: tuple[Any, list[Any], dict[str, Any]], mesh: DeviceMesh
) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    op, args, kwargs = call
    return op, tuple(make(a, mesh) for a in args), {k: make(v, mesh) for k, v in kwargs.items()}


def lit(value: Any) -> tuple[str, Any]:
    return ("lit", value)


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
salts = st.integers(0, 7)


@st.composite
def placements(draw: st.DrawFn, ndim: int) -> Any:
    return draw(st.sampled_from([Replicate(), *(Shard(d) for d in range(ndim))]))


@st.composite
def dtensors(
    draw: st.DrawFn, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None
) -> Any:
    shape = draw(shapes) if shape is None else shape
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    return ("dt", shape, dtype, draw(placements(len(shape))), draw(salts))


python_scalars = st.one_of(
    st.integers(-3, 3), st.floats(-4, 4, allow_nan=False, width=32), st.booleans()
)
scalar_tensors = st.builds(lambda d, s: ("t", (), d, s), st.sampled_from(DTYPES), salts)

# --------------------------------------------------------------------------------------------------
# build_key: arbitrary argument structures.
# --------------------------------------------------------------------------------------------------

KEY_OPS = [
    aten.add.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.view.default,
    aten.sum.dim_IntList,
    aten.cat.default,
    aten._foreach_add.Scalar,
    aten._foreach_add.ScalarList,
    aten.clamp.Tensor,
    aten.native_layer_norm.default,
    aten._to_copy.default,
    aten.empty_like.default,
    aten.expand.default,
    aten.add_.Tensor,
]

leaf_args = st.one_of(
    dtensors(),
    scalar_tensors,
    st.builds(
        lambda s, d, salt: ("t", s, d, salt), shapes, st.sampled_from(DTYPES), salts
    ),  # non-0-d plain
    st.builds(
        lambda d, salt: ("t", (1,), d, salt), st.sampled_from(DTYPES), salts
    ),  # (1,)-shaped plain
    python_scalars.map(lit),
    st.just(lit(None)),
    st.lists(st.integers(-2, 8), max_size=3).map(lit),  # int lists
    st.sampled_from([torch.float16, torch.float64, torch.int32]).map(lit),
    st.sampled_from(["mean", ""]).map(lit),
)
list_args = st.one_of(
    st.lists(dtensors(), min_size=1, max_size=3).map(lambda xs: ("list", xs)),
    st.lists(
        st.one_of(dtensors(), scalar_tensors, st.just(lit(None)), python_scalars.map(lit)),
        min_size=1,
        max_size=3,
    ).map(lambda xs: ("list", xs)),
    st.lists(st.one_of(dtensors(), python_scalars.map(lit)), min_size=1, max_size=3).map(
        lambda xs: ("tuple", xs)
    ),
)
any_args = st.one_of(leaf_args, list_args)
kwarg_names = st.sampled_from(
    ["alpha", "dtype", "memory_format", "keepdim", "out", "eps", "weight", "min"]
)
kwarg_values = st.one_of(
    dtensors(),
    scalar_tensors,
    python_scalars.map(lit),
    st.just(lit(None)),
    st.sampled_from([torch.float16, torch.float64, torch.contiguous_format]).map(lit),
    st.lists(dtensors(), min_size=1, max_size=2).map(lambda xs: ("list", xs)),
    st.lists(st.integers(0, 3), max_size=2).map(lit),
)


@given(
    op=st.sampled_from(KEY_OPS),
    args=st.lists(any_args, max_size=5),
    kwargs=st.dictionaries(kwarg_names, kwarg_values, max_size=3),
)
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_build_key_equals_twin(
    mesh: DeviceMesh, op: Any, args: list[Any], kwargs: dict[str, Any]
) -> None:
    assert _dispatch is not None
    op, real_args, real_kwargs = make_call((op, args, kwargs), mesh)
    ours = _dispatch.build_key(op, real_args, real_kwargs)
    twin = dispatch.build_key(op, real_args, real_kwargs)
    assert ours == twin
    assert type(ours) is type(twin)
    if twin is not None:
        assert hash(ours) == hash(twin)
        assert len(ours) == len(twin)
        # identity where the twin stores objects (specs, markers, the op), equality elsewhere
        for mine, theirs in zip(ours, twin, strict=True):
            if (
                theirs is cache.KWARGS_MARKER
                or theirs is cache._LIST
                or theirs is op
                or theirs is None
            ):
                assert mine is theirs


def test_build_key_edge_cases(mesh: DeviceMesh) -> None:
    assert _dispatch is not None
    x = dtdispatch.accelerate(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    cases: list[tuple[Any, Any, Any]] = [
        (aten.add.Tensor, (x, x), {}),
        (aten.add.Tensor, (x, torch.ones(4, 4)), {}),  # mixed plain tensor: no key
        (aten.add.Tensor, (torch.tensor(1.0), torch.tensor(2.0)), {}),  # no DTensor: no key
        (aten.add.Tensor, (x, torch.ones(1)), {}),  # (1,)-shaped: no key
        (aten.add.Tensor, (x, x), {"alpha": 2}),  # kwargs that do not count leave no separator
        (aten.cat.default, [[x, x], 0], {}),  # args as a list
        (aten.cat.default, ((x, x),), {}),  # a tuple of tensors
        (aten.view.default, (x, torch.Size([16])), {}),  # a tuple subclass
        (aten._to_copy.default, (x,), {"dtype": torch.float16}),
        (aten._foreach_add.List, ([x], [x]), {"alpha": 1.0}),
        (aten.add.Tensor, (x, x), {"other": [x]}),  # a tensor list in kwargs: no key
    ]
    for op, args, kwargs in cases:
        ours = _dispatch.build_key(op, args, kwargs)
        twin = dispatch.build_key(op, args, kwargs)
        assert ours == twin, (op, args, kwargs)
        if twin is not None:
            assert hash(ours) == hash(twin)
    # Keyword arguments work as for the Python function.
    assert _dispatch.build_key(op=aten.add.Tensor, args=(x, x), kwargs={}) == dispatch.build_key(
        aten.add.Tensor, (x, x), {}
    )


def test_build_key_non_dict_kwargs_and_generic_sequences(mesh: DeviceMesh) -> None:
    """Inputs the C does not model go to the twin, so even these agree."""
    assert _dispatch is not None
    x = dtdispatch.accelerate(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))

    class MyList(list):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            return iter(list.__iter__(self))

    class Mapping(dict):  # type: ignore[type-arg]
        pass

    def outcome(fn: Callable[[], Any]) -> Any:
        try:
            return ("returned", fn())
        except Exception as exc:
            return ("raised", type(exc), str(exc))

    for op, args, kwargs in [
        (aten.cat.default, (MyList([x, x]),), {}),  # a list subclass with its own __iter__
        (aten._to_copy.default, (x,), Mapping(dtype=torch.float16)),  # a dict subclass
        (aten.add.Tensor, iter([x, x]), {}),  # not a sequence: both raise the same TypeError
        (aten.add.Tensor, (x, x), None),  # not a mapping, but empty-ish: both agree
    ]:
        ours = outcome(lambda: _dispatch.build_key(op, args, kwargs))  # noqa: B023
        twin = outcome(lambda: dispatch.build_key(op, args, kwargs))  # noqa: B023
        assert ours == twin, (ours, twin)


# --------------------------------------------------------------------------------------------------
# dispatch: valid calls per op, run through both implementations.
# --------------------------------------------------------------------------------------------------


@st.composite
def binary(draw: st.DrawFn, op: Any, in_place: bool = False) -> Any:
    shape = draw(shapes)
    dtype = draw(st.sampled_from(FLOATS))
    x = draw(dtensors(shape, dtype))
    other = draw(
        st.one_of(
            dtensors(shape, dtype),
            python_scalars.map(lit),
            scalar_tensors.filter(lambda t: not in_place or t[2] in FLOATS),
        )
    )
    kwargs: dict[str, Any] = {}
    if op in (aten.add.Tensor, aten.add_.Tensor) and draw(st.booleans()):
        kwargs["alpha"] = lit(draw(st.sampled_from([2, 0.5, 1])))
    return op, [x, other], kwargs


@st.composite
def add_out(draw: st.DrawFn) -> Any:
    shape = draw(shapes)
    x, y = draw(dtensors(shape, torch.float32)), draw(dtensors(shape, torch.float32))
    out = ("dt", shape, torch.float32, x[3], 0)
    return aten.add.out, [x, y], {"out": out}


@st.composite
def view(draw: st.DrawFn) -> Any:
    a, b = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = draw(dtensors((a, b)))
    size = draw(st.sampled_from([[a * b], [b, a], [-1], [a, b], [a, 1, b]]))
    return aten.view.default, [x, lit(size)], {}


@st.composite
def sum_dims(draw: st.DrawFn) -> Any:
    x = draw(
        dtensors(
            draw(st.lists(st.integers(1, 4), min_size=2, max_size=3).map(tuple)), torch.float32
        )
    )
    dims = draw(st.sampled_from([[0], [1], [0, 1], [-1]]))
    args = [x, lit(dims)]
    if draw(st.booleans()):
        args.append(lit(draw(st.booleans())))
    kwargs = {"dtype": lit(torch.float64)} if draw(st.booleans()) else {}
    return aten.sum.dim_IntList, args, kwargs


@st.composite
def cat(draw: st.DrawFn) -> Any:
    shape = draw(st.lists(st.integers(1, 4), min_size=2, max_size=2).map(tuple))
    xs = draw(st.lists(dtensors(shape, torch.float32), min_size=1, max_size=3))
    args: list[Any] = [("list", xs)]
    if draw(st.booleans()):
        args.append(lit(draw(st.sampled_from([0, 1, -1]))))
    return aten.cat.default, args, {}


@st.composite
def foreach_scalar(draw: st.DrawFn) -> Any:
    xs = draw(st.lists(dtensors(dtype=torch.float32), min_size=1, max_size=3))
    return aten._foreach_add.Scalar, [("list", xs), lit(draw(st.floats(-2, 2, width=32)))], {}


@st.composite
def foreach_scalar_list(draw: st.DrawFn) -> Any:
    xs = draw(st.lists(dtensors(dtype=torch.float32), min_size=1, max_size=3))
    scalars = draw(st.lists(st.floats(-2, 2, width=32), min_size=len(xs), max_size=len(xs)))
    return aten._foreach_add.ScalarList, [("list", xs), lit(scalars)], {}


@st.composite
def clamp(draw: st.DrawFn) -> Any:
    shape = draw(shapes)
    x = draw(dtensors(shape, torch.float32))
    lo = draw(st.one_of(st.just(lit(None)), dtensors(shape, torch.float32)))
    hi = draw(st.one_of(st.just(lit(None)), dtensors(shape, torch.float32)))
    args = [x, lo, hi]
    if hi == lit(None) and draw(st.booleans()):
        args.pop()  # trailing default dropped, as the dispatcher does
    return aten.clamp.Tensor, args, {}


@st.composite
def layer_norm(draw: st.DrawFn) -> Any:
    a, b = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = draw(dtensors((a, b), torch.float32))
    affine = st.one_of(
        st.just(lit(None)), st.builds(lambda s: ("dt", (b,), torch.float32, Replicate(), s), salts)
    )
    eps = draw(st.sampled_from([1e-5, 1e-6]))
    return aten.native_layer_norm.default, [x, lit([b]), draw(affine), draw(affine), lit(eps)], {}


@st.composite
def to_copy(draw: st.DrawFn) -> Any:
    return aten._to_copy.default, [draw(dtensors())], {"dtype": lit(draw(st.sampled_from(DTYPES)))}


@st.composite
def empty_like(draw: st.DrawFn) -> Any:
    kwargs = {"dtype": lit(draw(st.sampled_from(DTYPES)))} if draw(st.booleans()) else {}
    return aten.empty_like.default, [draw(dtensors())], kwargs


@st.composite
def expand(draw: st.DrawFn) -> Any:
    a, b = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if draw(st.booleans()):
        x = draw(dtensors((1, b)))
    else:
        x = draw(dtensors((b,)))
    return aten.expand.default, [x, lit([a, b])], {}


CALLS: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
    "add": lambda: binary(aten.add.Tensor),
    "mul": lambda: binary(aten.mul.Tensor),
    "div": lambda: binary(aten.div.Tensor),
    "add_": lambda: binary(aten.add_.Tensor, in_place=True),
    "add.out": add_out,
    "view": view,
    "sum.dim_IntList": sum_dims,
    "cat": cat,
    "_foreach_add.Scalar": foreach_scalar,
    "_foreach_add.ScalarList": foreach_scalar_list,
    "clamp.Tensor": clamp,
    "native_layer_norm": layer_norm,
    "_to_copy": to_copy,
    "empty_like": empty_like,
    "expand": expand,
}
UNINITIALIZED = {"empty_like"}  # values are whatever memory held: compare metadata only


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).tolist())


def summarize(value: Any, values: bool, seen: dict[int, str]) -> Any:
    """Everything observable about a result: types, placements, metadata, local bits, identity."""
    if isinstance(value, torch.Tensor):
        tag = seen.get(id(value))
        # which input's storage the result shares (views: return_and_correct_aliasing's unsafe_set)
        shares = seen.get(value.untyped_storage()._cdata) if seen else None
        local = value._local_tensor if isinstance(value, DTensor) else value
        info = (
            type(value).__name__,
            tag,
            shares,
            tuple(value.placements) if isinstance(value, DTensor) else None,
            tuple(value.shape),
            tuple(local.shape),
            local.stride(),
            value.dtype,
            value.requires_grad,
            _bits(local) if values else None,
        )
        return info
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [summarize(v, values, seen) for v in value])
    return (type(value).__name__, value)


def run_calls(
    impl: str, call: Any, mesh: DeviceMesh, values: bool
) -> tuple[list[Any], dict[str, Any]]:
    # The dispatch path is compared here: the path above it (which replays no-autograd calls and
    # would take the hits away) is off; tests/test_native_function.py compares that one.
    dispatcher.install(impl, above=False)
    dtdispatch.clear_cache()
    dtdispatch.reset_stats()
    outcomes = []
    # A miss (slow path, plan written), then hits (the implementation's replay); the last two call
    # __torch_dispatch__ directly, so its own return value is compared too (torch's binding returns
    # ``self`` for in-place ops whatever the handler returns).
    for attempt in range(5):
        op, args, kwargs = make_call(call, mesh)
        # name the inputs, so that "returned self" / "returned out=" is part of the comparison
        seen: dict[int, str] = {}
        for name, a in [
            *((f"arg{i}", a) for i, a in enumerate(args)),
            *((f"kw:{k}", v) for k, v in kwargs.items()),
        ]:
            for t in a if isinstance(a, list) else [a]:
                if isinstance(t, torch.Tensor):
                    seen[id(t)] = name
                    seen[t.untyped_storage()._cdata] = name
        try:
            if attempt < 3:
                result = op(*args, **kwargs)
            else:
                result = FastDTensor.__torch_dispatch__(op, (FastDTensor,), args, kwargs)
        except Exception as exc:  # the same exception, from both
            outcomes.append(("raised", type(exc).__name__, str(exc)))
            continue
        outcomes.append(
            (
                "returned",
                summarize(result, values, seen),
                summarize(list(args), values, {}),  # in-place effects on the inputs
                summarize(dict(kwargs).get("out"), values, {}),
            )
        )
    stats = dtdispatch.stats()
    return outcomes, {k: stats[k] for k in ("hits", "misses", "bailouts", "per_op")}


@pytest.mark.parametrize("name", sorted(CALLS))
@given(data=st.data())
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_dispatch_matches_twin(mesh: DeviceMesh, name: str, data: st.DataObject) -> None:
    call = data.draw(CALLS[name]())
    values = name not in UNINITIALIZED
    try:
        twin = run_calls("python", call, mesh, values)
        ours = run_calls("native", call, mesh, values)
    finally:
        dispatcher.install(native.DEFAULT)
    assert ours[0] == twin[0]
    assert ours[1] == twin[1]


def test_plans_are_shared_between_implementations(mesh: DeviceMesh) -> None:
    """A plan written while the twin is installed is a hit for the C path (and back): equal keys."""
    x = dtdispatch.accelerate(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    r = dtdispatch.accelerate(distribute_tensor(torch.ones(4, 4), mesh, [Replicate()]))
    calls: list[Callable[[], Any]] = [
        lambda: x + r,
        lambda: x * 2.5,
        lambda: torch.cat([x, r], 1),
        lambda: x.view(16),
        lambda: torch._foreach_add([x, r], 1.0),
        lambda: x.to(torch.float64),
        lambda: x.sum(0, keepdim=True),
    ]
    try:
        for first, second in (("python", "native"), ("native", "python")):
            dtdispatch.clear_cache()
            # The dispatch path's plans are compared: the path above it is off.
            dispatcher.install(first, above=False)
            for fn in calls:
                fn()
            dtdispatch.reset_stats()
            dispatcher.install(second, above=False)
            for fn in calls:
                fn()
            stats = dtdispatch.stats()
            assert stats["misses"] == 0, stats
            assert stats["hits"] >= len(calls), stats
    finally:
        dispatcher.install(native.DEFAULT)


def test_lru_order_and_evictions_match_twin(mesh: DeviceMesh) -> None:
    """Hits move their plan to the LRU end exactly as the twin's ``move_to_end`` does."""
    x = dtdispatch.accelerate(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    calls: list[Callable[[], Any]] = [
        lambda: x + x,
        lambda: x * x,
        lambda: x - x,
        lambda: x.view(16),
        lambda: torch.relu(x),
    ]
    order = [0, 1, 2, 0, 3, 1, 0, 4, 2, 0, 0, 3, 1, 4, 4, 2]
    snapshots = {}
    capacity = cache._default_capacity
    try:
        dtdispatch.set_cache_capacity(3)
        for impl in ("python", "native"):
            dispatcher.install(impl, above=False)  # the dispatch path's LRU
            dtdispatch.clear_cache()
            dtdispatch.reset_stats()
            seen = []
            for i in order:
                calls[i]()
                seen.append([str(k[0]) for k in cache.thread_cache().entries])
            stats = dtdispatch.stats()
            snapshots[impl] = (seen, stats["hits"], stats["misses"], stats["evictions"])
    finally:
        dtdispatch.set_cache_capacity(capacity)
        dispatcher.install(native.DEFAULT)
    assert snapshots["native"] == snapshots["python"]
    assert snapshots["native"][3] > 0
