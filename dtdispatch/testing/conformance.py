"""The conformance table: (op, inputs, placements) cases run on stock DTensor and on dtdispatch,
compared bitwise.

Used by ``tests/distributed/test_conformance.py`` and ``launch/correctness.py``. Every rank builds
the same global inputs from a seed, so a case needs no communication to set up beyond what DTensor
itself does.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed.tensor._random as dt_random
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Placement

from dtdispatch import FastDTensor
from dtdispatch._tensor import FAST_TYPES
from dtdispatch.testing._bits import bits as _bits

__all__ = ["CASES", "CASES_2D", "Case", "Inp", "run_case"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Inp:
    """One tensor input: placements per mesh dim ("S0", "S1", "R", "P"), or "plain" for a
    torch.Tensor."""

    placements: str | tuple[str, ...]
    shape: tuple[int, ...] = (8, 8)
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable[..., Any]
    inputs: tuple[Inp, ...]
    random: bool = False
    tags: tuple[str, ...] = field(default=())


def _placement(code: str) -> Placement:
    if code == "R":
        return Replicate()
    if code == "P":
        return Partial()
    if code.startswith("S"):
        return Shard(int(code[1:]))
    raise ValueError(f"unknown placement code {code!r}; use S<dim>, R or P")


def _make_inputs(case: Case, mesh: DeviceMesh) -> list[Any]:
    """Build the case's inputs on this rank: stock DTensors (or plain tensors)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    made: list[Any] = []
    for inp in case.inputs:
        if inp.dtype.is_floating_point:
            value = torch.randn(inp.shape, generator=gen, dtype=inp.dtype)
        else:
            value = torch.randint(0, 8, inp.shape, generator=gen, dtype=inp.dtype)
        if inp.placements == "plain":
            made.append(value)
            continue
        codes = (inp.placements,) if isinstance(inp.placements, str) else inp.placements
        if len(codes) != mesh.ndim:
            codes = codes + ("R",) * (mesh.ndim - len(codes))
        if "P" in codes:
            # Partial: each rank holds a different addend; the global value is their sum.
            coordinate = mesh.get_coordinate() or [0] * mesh.ndim
            shard_codes = ["R" if c == "P" else c for c in codes]
            base = distribute_tensor(value, mesh, [_placement(c) for c in shard_codes])
            local = base._local_tensor + float(sum(coordinate))
            made.append(
                DTensor.from_local(
                    local,
                    mesh,
                    [_placement(c) for c in codes],
                    shape=base.shape,
                    stride=base.stride(),
                )
            )
        else:
            made.append(distribute_tensor(value, mesh, [_placement(c) for c in codes]))
    return made


def _copy(x: Any, cls: type[DTensor]) -> Any:
    """A private copy of one input: a ``cls`` (DTensor or FastDTensor) over a cloned local shard."""
    if isinstance(x, DTensor):
        local = x._local_tensor.clone()
        return torch.Tensor._dtensor__new__(cls, local, x._spec, requires_grad=False)
    if isinstance(x, torch.Tensor):
        return x.clone()
    return x


def _compare(stock: Any, fast: Any, where: str) -> None:
    if isinstance(stock, DTensor):
        if type(fast) not in FAST_TYPES:
            raise AssertionError(f"{where}: expected FastDTensor, got {type(fast).__name__}")
        if stock.placements != fast.placements:
            raise AssertionError(
                f"{where}: placements {fast.placements} != stock {stock.placements}"
            )
        if (
            stock.shape != fast.shape
            or stock.stride() != fast.stride()
            or stock.dtype != fast.dtype
        ):
            raise AssertionError(
                f"{where}: global meta {fast.shape}/{fast.stride()}/{fast.dtype} != stock "
                f"{stock.shape}/{stock.stride()}/{stock.dtype}"
            )
        _compare(stock._local_tensor, fast._local_tensor, where + " local")
    elif isinstance(stock, torch.Tensor):
        if not isinstance(fast, torch.Tensor) or isinstance(fast, DTensor):
            raise AssertionError(f"{where}: expected a plain tensor, got {type(fast).__name__}")
        if (
            stock.shape != fast.shape
            or stock.dtype != fast.dtype
            or stock.stride() != fast.stride()
        ):
            raise AssertionError(
                f"{where}: local meta {fast.shape}/{fast.dtype} != stock "
                f"{stock.shape}/{stock.dtype}"
            )
        if not torch.equal(_bits(stock), _bits(fast)):
            raise AssertionError(f"{where}: values differ: {fast} vs stock {stock}")
    elif isinstance(stock, (list, tuple)):
        if type(stock) is not type(fast) or len(stock) != len(fast):
            raise AssertionError(f"{where}: structure {type(fast).__name__}[{len(fast)}] != stock")
        for i, (s, f) in enumerate(zip(stock, fast, strict=False)):
            _compare(s, f, f"{where}[{i}]")
    elif stock != fast:
        raise AssertionError(f"{where}: {fast!r} != stock {stock!r}")


def _run(case: Case, inputs: list[Any], seed: int) -> tuple[Any, BaseException | None]:
    if case.random:
        torch.manual_seed(seed)
        dt_random._rng_tracker = None
    try:
        return case.fn(*inputs), None
    except Exception as exc:  # the comparison is on the exception type
        return None, exc


def run_case(case: Case, mesh: DeviceMesh) -> None:
    """Run ``case`` on stock DTensor and on dtdispatch with the same inputs; raise AssertionError
    on any difference: result values bitwise, placements, global shape/stride, types, ``self``
    identity for in-place ops, the inputs after the op, and the exception type where stock
    raises."""
    base = _make_inputs(case, mesh)
    stock_in = [_copy(x, DTensor) for x in base]
    fast_in = [_copy(x, FastDTensor) for x in base]
    stock_out, stock_exc = _run(case, stock_in, 1234)
    fast_out, fast_exc = _run(case, fast_in, 1234)
    if stock_exc is not None or fast_exc is not None:
        if type(stock_exc) is not type(fast_exc):
            raise AssertionError(
                f"{case.name}: dtdispatch raised {fast_exc!r}, stock raised {stock_exc!r}"
            )
        return
    _compare(stock_out, fast_out, case.name)
    for i, (s, f) in enumerate(zip(stock_in, fast_in, strict=False)):
        _compare(s, f, f"{case.name} input {i} after the op")
        if isinstance(s, DTensor) and stock_out is s and fast_out is not f:
            raise AssertionError(f"{case.name}: in-place op did not return self")


def _c(name: str, fn: Callable[..., Any], *inputs: Inp | str | tuple[str, ...], **kw: Any) -> Case:
    return Case(name, fn, tuple(i if isinstance(i, Inp) else Inp(i) for i in inputs), **kw)


def _out_add(a: Any, b: Any, o: Any) -> Any:
    return torch.add(a, b, out=o)


def _out_mul(a: Any, b: Any, o: Any) -> Any:
    return torch.mul(a, b, out=o)


def _inplace(method: str, *extra: Any) -> Callable[..., Any]:
    def fn(a: Any, *rest: Any) -> Any:
        return getattr(a, method)(*rest, *extra)

    return fn


CASES: list[Case] = [
    # Elementwise unary.
    _c("relu S0", torch.relu, "S0"),
    _c("relu S1", torch.relu, "S1"),
    _c("neg R", torch.neg, "R"),
    _c("exp S0", torch.exp, "S0"),
    _c("sigmoid S1", torch.sigmoid, "S1"),
    _c("neg P", torch.neg, "P"),
    _c("relu P", torch.relu, "P"),
    _c("abs S0 uneven", torch.abs, Inp("S0", (6, 8))),
    # Elementwise binary.
    _c("add S0+S0", torch.add, "S0", "S0"),
    _c("add S0+R", torch.add, "S0", "R"),
    _c("add R+R", torch.add, "R", "R"),
    _c("add P+P", torch.add, "P", "P"),
    _c("add S0+S1", torch.add, "S0", "S1"),
    _c("mul S0*S0", torch.mul, "S0", "S0"),
    _c("mul P*2.5", lambda a: a * 2.5, "P"),
    _c("add S0+3", lambda a: a + 3, "S0"),
    _c("div S1/7.0", lambda a: a / 7.0, "S1"),
    _c("sub alpha", lambda a, b: torch.sub(a, b, alpha=2), "S0", "S0"),
    _c("add broadcast row R", torch.add, "S0", Inp("R", (8,))),
    _c("mul scalar tensor", lambda a, b: a * b, "S0", Inp("plain", ())),
    _c("add scalar tensor first", lambda b, a: b + a, Inp("plain", ()), "S1"),
    _c("mixed plain tensor raises", torch.add, "S0", Inp("plain", (8, 8))),
    _c("where S0", lambda a, b: torch.where(a > 0, a, b), "S0", "S0"),
    _c("int add S0", torch.add, Inp("S0", dtype=torch.int64), Inp("S0", dtype=torch.int64)),
    _c("int true div S0", lambda a: a / 2, Inp("S0", dtype=torch.int64)),
    _c("clamp min", lambda a: torch.clamp(a, min=-0.5), "S0"),
    # Reductions.
    _c("sum all S0", torch.sum, "S0"),
    _c("sum dim0 S0", lambda a: a.sum(0), "S0"),
    _c("sum dim1 S0", lambda a: a.sum(1), "S0"),
    _c("sum keepdim S1", lambda a: a.sum(1, keepdim=True), "S1"),
    _c("mean S0", torch.mean, "S0"),
    _c("amax S1", lambda a: a.amax(1), "S1"),
    _c("sum P", torch.sum, "P"),
    # Matmul family.
    _c("mm S0xR", torch.mm, "S0", "R"),
    _c("mm RxS1", torch.mm, "R", "S1"),
    _c("mm S1xS0", torch.mm, "S1", "S0"),
    _c("mm S0xS0", torch.mm, "S0", "S0"),
    _c("addmm", torch.addmm, Inp("R", (8,)), "S0", "R"),
    _c("bmm S0", torch.bmm, Inp("S0", (4, 8, 8)), Inp("S0", (4, 8, 8))),
    _c("linear colwise", F.linear, "R", "S0", Inp("S0", (8,))),
    _c("linear rowwise", F.linear, "S1", "S1"),
    _c("mm shape mismatch raises", torch.mm, "S0", Inp("R", (4, 8))),
    # Views.
    _c("view S0", lambda a: a.view(64), "S0"),
    _c("reshape S0", lambda a: a.reshape(4, 16), "S0"),
    _c("view S1", lambda a: a.view(64), "S1"),
    _c("view R", lambda a: a.view(-1), "R"),
    _c("transpose S0", lambda a: a.transpose(0, 1), "S0"),
    _c("permute 3d S2", lambda a: a.permute(2, 0, 1), Inp("S2", (4, 4, 8))),
    _c("t S1", torch.t, "S1"),
    _c("unsqueeze S0", lambda a: a.unsqueeze(0), "S0"),
    _c("squeeze S1", lambda a: a.squeeze(0), Inp("S1", (1, 8))),
    _c("squeeze dim S0", lambda a: a.squeeze(1), Inp("S0", (8, 1))),
    _c("expand R", lambda a: a.expand(4, 8), Inp("R", (1, 8))),
    _c("expand S1", lambda a: a.expand(4, 8), Inp("S1", (1, 8))),
    _c("flatten S0", lambda a: a.flatten(), Inp("S0", (4, 4, 4))),
    # Lists.
    _c("cat dim0 S0", lambda a, b: torch.cat([a, b]), "S0", "S0"),
    _c("cat dim1 S0", lambda a, b: torch.cat([a, b], dim=1), "S0", "S0"),
    _c("cat R", lambda a, b: torch.cat([a, b]), "R", "R"),
    _c("stack S1", lambda a, b: torch.stack([a, b]), "S1", "S1"),
    _c("foreach add scalar", lambda a, b: torch._foreach_add([a, b], 2.0), "S0", "S1"),
    _c("foreach mul scalarlist", lambda a, b: torch._foreach_mul([a, b], [2.0, 0.5]), "S0", "R"),
    _c(
        "foreach add list",
        lambda a, b, c, d: torch._foreach_add([a, b], [c, d]),
        "S0",
        "R",
        "S0",
        "R",
    ),
    _c("foreach mul_ inplace", lambda a, b: torch._foreach_mul_([a, b], 0.9), "S0", "S1"),
    _c("foreach norm", lambda a, b: torch._foreach_norm([a, b]), "S0", "R"),
    # In-place.
    _c("add_ S0", lambda a, b: a.add_(b), "S0", "S0"),
    _c("add_ S0+R", lambda a, b: a.add_(b), "S0", "R"),
    _c("mul_ scalar", lambda a: a.mul_(0.5), "S1"),
    _c("zero_ S0", lambda a: a.zero_(), "S0"),
    _c("copy_ S0<-S0", lambda a, b: a.copy_(b), "S0", "S0"),
    _c("copy_ S0<-R", lambda a, b: a.copy_(b), "S0", "R"),
    _c("squeeze_ reindex", lambda a: a.squeeze_(0), Inp("S1", (1, 8))),
    # out=.
    _c("add out", _out_add, "S0", "S0", "S0"),
    _c("mul out R", _out_mul, "R", "R", "R"),
    # equal.
    _c("equal same", lambda a: torch.equal(a, a), "S0"),
    _c("equal different", torch.equal, "S0", "S0"),
    # NN.
    _c("softmax S0 last", lambda a: torch.softmax(a, -1), "S0"),
    _c("softmax S1 dim1", lambda a: torch.softmax(a, 1), "S1"),
    _c("log_softmax S0", lambda a: torch.log_softmax(a, -1), "S0"),
    _c(
        "layer_norm S0",
        lambda a, w, b: F.layer_norm(a, (8,), w, b),
        "S0",
        Inp("R", (8,)),
        Inp("R", (8,)),
    ),
    _c("layer_norm S1", lambda a: F.layer_norm(a, (8,)), "S1"),
    _c(
        "embedding R", lambda i, w: F.embedding(i, w), Inp("R", (4,), torch.int64), Inp("R", (8, 8))
    ),
    _c(
        "embedding colwise",
        lambda i, w: F.embedding(i, w),
        Inp("R", (4,), torch.int64),
        Inp("S1", (8, 8)),
    ),
    _c("gelu S1", F.gelu, "S1"),
    # Random.
    _c("dropout S0", lambda a: F.dropout(a, 0.5, training=True), "S0", random=True),
    _c("rand_like S1", torch.rand_like, "S1", random=True),
    _c("normal_ S0", lambda a: a.normal_(), "S0", random=True),
    _c("uniform_ R", lambda a: a.uniform_(), "R", random=True),
    _c("bernoulli S0", lambda a: torch.bernoulli(a.abs().clamp(max=1)), "S0", random=True),
    # Defaulted trailing arguments, given and omitted.
    _c("sum dim default given", lambda a: aten.sum.dim_IntList(a, [0], False), "S0"),
    _c("sum dim default omitted", lambda a: aten.sum.dim_IntList(a, [0]), "S0"),
    _c("add alpha default given", lambda a, b: aten.add.Tensor(a, b, alpha=1), "S0", "S0"),
    _c("div mode None", lambda a, b: aten.div.Tensor_mode(a, b, rounding_mode=None), "S0", "S0"),
    _c(
        "div mode floor", lambda a, b: aten.div.Tensor_mode(a, b, rounding_mode="floor"), "S0", "S0"
    ),
]

# 2-D (2x2) cases: the placement codes name both mesh dims.
CASES_2D: list[Case] = [
    _c("2d add S0R+S0R", torch.add, ("S0", "R"), ("S0", "R")),
    _c("2d add S0S1+RR", torch.add, ("S0", "S1"), ("R", "R")),
    _c("2d mm S0R x RS1", torch.mm, ("S0", "R"), ("R", "S1")),
    _c("2d mm RS1 x RS0", torch.mm, ("R", "S1"), ("R", "S0")),
    _c("2d sum S0S1", torch.sum, ("S0", "S1")),
    _c("2d view S0R", lambda a: a.view(64), ("S0", "R")),
    _c("2d relu PR", torch.relu, ("P", "R")),
    _c("2d softmax RS0", lambda a: torch.softmax(a, -1), ("R", "S0")),
    _c("2d cat S1S1", lambda a, b: torch.cat([a, b]), ("S1", "R"), ("S1", "R")),
    _c("2d add_ S0S1", lambda a, b: a.add_(b), ("S0", "S1"), ("S0", "S1")),
    _c("2d dropout S0S1", lambda a: F.dropout(a, 0.5, training=True), ("S0", "S1"), random=True),
    _c("2d layer_norm S0R", lambda a: F.layer_norm(a, (8,)), ("S0", "R")),
]


def run_all(cases: Sequence[Case], mesh: DeviceMesh) -> list[tuple[str, str]]:
    """Run cases, returning (name, "" or the failure) per case: the table
    ``launch/correctness.py`` prints."""
    results = []
    for case in cases:
        try:
            run_case(case, mesh)
            results.append((case.name, ""))
        except AssertionError as exc:
            results.append((case.name, str(exc)))
    return results
