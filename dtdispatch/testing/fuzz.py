"""Differential fuzzing: random DTensor programs on stock DTensor and on dtdispatch, compared
bitwise.

A ``Program`` is a mesh, a list of ``Input`` tensors and a list of Python source lines over names
``t0, t1, ...`` (the inputs first). ``generate(seed, index, ...)`` draws one reproducibly (the same
program on every rank, so collectives match); the generator checks each line on ``meta`` tensors of
the global shapes, so most programs are well-formed and the interesting failures are the DTensor
ones.

``check(program)`` runs it on stock DTensor once, then on dtdispatch three times: after clearing
the plan cache (plans), again (replays) and at cache capacity 1 (every call evicts). It compares
every name's value (type, placements, global shape/stride/dtype, local bits), requires_grad,
object identity between names (in-place and ``out=`` return their argument), the inputs'
gradients, and where stock raises, the line and the exception type. Any rank raising ends the
program on every rank (one all-reduce per line), so a failure on one rank never hangs the others.

``shrink(program)`` delta-debugs a failing program (drop lines, simplify inputs) and ``render``
prints it as a script runnable under torchrun. Every function here is collective: call it on all
ranks with the same arguments.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.tensor._random as dt_random
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import loss_parallel
from torch.distributed.tensor.placement_types import Placement
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import dtdispatch
from dtdispatch import FastDTensor, _compat, _tensor
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import cache as _cache
from dtdispatch._tensor import FAST_TYPES
from dtdispatch.testing import _meshes
from dtdispatch.testing._bits import bits as _bits

__all__ = [
    "AVOIDED",
    "EXCLUSIONS",
    "Input",
    "NullDispatchMode",
    "NullFunctionMode",
    "Program",
    "check",
    "features",
    "fuzz",
    "generate",
    "make_input",
    "mesh_for",
    "render",
    "shrink",
]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "bool": torch.bool,
    "complex64": torch.complex64,
}
_FLOATS = ("float32", "float64", "bfloat16")
_GRADABLE = (*_FLOATS, "complex64")  # dtypes an input may require grad in

# Known, documented places where dtdispatch may differ from stock: (substring of stock's exception
# message, its type name, a function its traceback passes through or "" for any, why). A program
# whose stock run raises such an exception on any rank is not compared at all, whatever dtdispatch
# does.
EXCLUSIONS: tuple[tuple[str, str, str, str], ...] = (
    (
        "MaskBuffer has been materialized with conflicting data",
        "RuntimeError",
        "",
        "stock's cached _MaskPartial shares one mask buffer per cache entry and raises 'MaskBuffer "
        "has been materialized with conflicting data'; dtdispatch gives each call its own mask",
    ),
    (
        "Meta tensors",
        "NotImplementedError",
        "materialize_mask",
        "the same shared mask buffer on the meta device: a second lookup with the same shardings "
        "while the first's mask is live makes stock compare the two masks with torch.equal, which "
        "meta tensors cannot run; dtdispatch gives each call its own mask and compares none",
    ),
    (
        "unhashable type: 'complex'",
        "RuntimeError",
        "",
        "stock's sharding cache hashes the scalar arguments it keys and cannot hash a complex one "
        "(the backward of complex angle, addmm ...); dtdispatch runs the call (see "
        "ARCHITECTURE 'Where dtdispatch differs from stock on purpose'; the OpInfo check "
        "compares such calls with plain tensors)",
    ),
    (
        "too many indices for tensor of dimension",
        "IndexError",
        "apply_mask",
        "stock's lookups of the same shapes share one cached _MaskPartial mask buffer: with two "
        "lookups alive and one output reduced twice (by an op's redistribution, then when read), "
        "stock's second reduction applies a mask to the reduced tensor; dtdispatch gives each "
        "lookup its own mask and raises what stock raises with one lookup (AssertionError: the "
        "mask was released)",
    ),
    (
        "Operator aten.detach_.default does not have a sharding strategy registered",
        "NotImplementedError",
        "",
        "torch 2.12's DTensor has no sharding strategy for detach_, which its redistribute and "
        "full_tensor run under inference mode on an input that requires grad (2.13 registers "
        "one); dtdispatch returns what 2.13 and later return",
    ),
)


# What the generator never draws, because stock itself fails there in a way no comparison survives.
AVOIDED: tuple[tuple[str, str], ...] = (
    (
        "amax / max(dim) / argmax over a tensor that may have an empty local shard",
        "the local kernel raises on the ranks whose shard is empty (a reduction over a zero-size "
        "dim), while the other ranks enter the collective of torch's argmax handler or the Partial "
        "reduction and hang: stock DTensor deadlocks",
    ),
    (
        "tensors with a zero-size dim (e.g. t[1:] of a size-1 dim)",
        "torch's sharding propagation for a view of them (view_groups, e.g. flatten of a (1, 0, 8) "
        "tensor) loops forever",
    ),
    (
        "torch.equal of meta-device DTensors on a sub-mesh",
        "stock's equal all-reduces its result over the whole world, on non-participating ranks "
        "too; on the meta device the participating ranks raise (no data) before reaching it, so "
        "the collectives of the ranks no longer match",
    ),
    (
        "loss_parallel's cross_entropy on an input that may have an empty local shard",
        "torch's loss-parallel handler indexes the class dim on every rank: the ranks whose shard "
        "of it is empty raise (IndexError inside nll_loss_forward) while the others enter its "
        "all-reduce; gloo aborts on the mismatched collectives",
    ),
    (
        "tied(w, idx) on a table that may have an empty local shard",
        "the embedding's local lookup raises on the ranks whose shard of the table is empty "
        "(index_select on zero rows) while the others go on into the head's and the backward's "
        "collectives: gloo aborts",
    ),
    (
        "backward through torch.fft.ihfft of a tensor that requires grad",
        "stock's backward raises on some ranks only, by their local shape ('view_as_real doesn't "
        "work on unresolved conjugated tensors' on the 2-row shard of a (3, 4) Shard(0) input on "
        "2 ranks) while the others enter an all-gather: stock DTensor deadlocks",
    ),
    (
        "max(dim) / argmax on a sub-mesh",
        "torch's custom handlers for them run the local kernel on non-participating ranks too, "
        "whose local tensor is empty, and raise there only (IndexError) while participating ranks "
        "go on",
    ),
)


@dataclass(frozen=True)
class Input:
    """One input tensor: global shape, dtype name, placement codes per mesh dim ("S<d>", "R", "P"
    for Partial sum, "Pmax" for Partial max), whether it is a leaf requiring grad, whether its
    layout is column-major in the last two dims, the data seed, for int64 the exclusive upper
    bound of its values, and its device ("cpu", or "meta": local shards without data, as a model
    built on the meta device has)."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    placements: tuple[str, ...] = ("R",)
    requires_grad: bool = False
    noncontig: bool = False
    seed: int = 0
    high: int = 8
    device: str = "cpu"


@dataclass(frozen=True)
class Program:
    """A mesh name (see ``mesh_for``), the implementation dtdispatch runs with, inputs ``t0..``
    and source lines over them."""

    mesh: str
    impl: str
    inputs: tuple[Input, ...]
    lines: tuple[str, ...]
    rng_seed: int = 0


def mesh_for(name: str) -> DeviceMesh:
    """The mesh a program runs on: "1d" (all ranks), "2d" (2x2, world size 4) or "sub:<ranks>"
    (a 1-D sub-mesh, e.g. "sub:0,1"; the other ranks do not participate)."""
    if name == "1d":
        return _meshes.mesh_1d()
    if name == "2d":
        return _meshes.mesh_2d()
    if name.startswith("sub:"):
        return _meshes.sub_mesh(ranks=tuple(int(r) for r in name[4:].split(",")))
    raise ValueError(f"unknown fuzz mesh {name!r}; use '1d', '2d' or 'sub:<r>,<r>...'")


def _placement(code: str) -> Placement:
    if code == "R":
        return Replicate()
    if code == "P":
        return Partial()
    if code == "Pmax":
        return Partial("max")
    if code.startswith("S"):
        return Shard(int(code[1:]))
    raise ValueError(f"unknown placement code {code!r}; use S<dim>, R or P")


def _placements(codes: Sequence[str]) -> list[Placement]:
    return [_placement(c) for c in codes]


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _global_value(inp: Input) -> torch.Tensor:
    gen = torch.Generator().manual_seed(inp.seed)
    dtype = _DTYPES[inp.dtype]
    if dtype.is_complex:
        value = torch.randn(inp.shape, generator=gen, dtype=dtype)
    elif dtype.is_floating_point:
        value = torch.randn(inp.shape, generator=gen).to(dtype)
    else:
        value = torch.randint(0, inp.high, inp.shape, generator=gen).to(dtype)
    return _col_major(value) if inp.noncontig and value.ndim >= 2 else value


def make_input(cls: type[DTensor], mesh: DeviceMesh, inp: Input) -> DTensor:
    """``inp`` as a leaf ``cls`` (DTensor or FastDTensor) on ``mesh``; needs no communication.

    Partial: rank coordinate c adds sum(c) to its addend, so the addends differ per rank.
    """
    value = _global_value(inp).to(inp.device)
    codes = list(inp.placements)
    shard_codes = ["R" if c.startswith("P") else c for c in codes]
    base = distribute_tensor(value, mesh, _placements(shard_codes), src_data_rank=None)
    local = base._local_tensor
    spec = base._spec
    if any(c.startswith("P") for c in codes):
        coordinate = mesh.get_coordinate()
        if coordinate is not None:
            local = local + sum(coordinate)
        spec = replace(spec, placements=tuple(_placements(codes)))
    if inp.noncontig and local.ndim >= 2:
        local = _col_major(local)
    else:
        local = local.clone()
    made: DTensor = torch.Tensor._dtensor__new__(cls, local, spec, requires_grad=inp.requires_grad)
    return made


def _meta_input(inp: Input) -> torch.Tensor:
    t = torch.empty(inp.shape, dtype=_DTYPES[inp.dtype], device="meta")
    if inp.noncontig and t.ndim >= 2:
        t = _col_major(t)
    return t.requires_grad_(inp.requires_grad)


def _redist_dt(t: DTensor, codes: Sequence[str]) -> DTensor:
    return t.redistribute(t.device_mesh, _placements(codes))


def _full_dt(t: DTensor) -> torch.Tensor:
    return t.full_tensor()


class NullDispatchMode(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch: untyped __init_subclass__
    """A TorchDispatchMode that runs every call unchanged (a program's ``DispatchMode()``)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class NullFunctionMode(TorchFunctionMode):
    """A TorchFunctionMode that runs every call unchanged (a program's ``FunctionMode()``)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _tied(fast: bool) -> Callable[[DTensor, DTensor], list[Any]]:
    """A program's ``tied(w, idx)``: a module whose embedding and head share one Parameter (a
    copy of ``w``, as Hugging Face ties an LM head to the input embedding), accelerated on the
    dtdispatch side as a user would (built from stock DTensors), then a forward, a backward and one
    SGD step. Returns the output, the shared gradient, both weights after the step and whether
    they are still one object."""

    def tied(w: DTensor, idx: DTensor) -> list[Any]:
        value = w.detach().clone()
        shared = nn.Parameter(dtdispatch.to_torch(value) if fast else value)
        model = nn.Module()
        model.emb = nn.Embedding(w.shape[0], w.shape[1], device="meta")
        model.head = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        model.emb.weight = shared
        model.head.weight = shared
        if fast:
            dtdispatch.accelerate(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        out = model.head(model.emb(idx))
        out.float().sum().backward()
        opt.step()
        emb, head = model.emb.weight, model.head.weight
        return [out, emb.grad, emb.detach(), head.detach(), emb is head]

    return tied


def _tied_meta(w: torch.Tensor, idx: torch.Tensor) -> list[Any]:
    return [F.linear(F.embedding(idx, w), w), w.clone(), w.clone(), w.clone(), True]


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A program's ``compiled(fn)``: ``fn`` under torch.compile (aot_eager, the backend that
    keeps eager numerics, so bits compare with stock)."""
    return torch.compile(fn, backend="aot_eager")


def _namespace(**helpers: Any) -> dict[str, Any]:
    return {
        "torch": torch,
        "F": F,
        "nn": nn,
        "checkpoint": checkpoint,
        "implicit_replication": implicit_replication,
        "loss_parallel": loss_parallel,
        "CommDebugMode": CommDebugMode,
        "DispatchMode": NullDispatchMode,
        "FunctionMode": NullFunctionMode,
        **helpers,
    }


def _real_namespace(fast: bool) -> dict[str, Any]:
    return _namespace(
        redist=_redist_dt, full=_full_dt, tied=_tied(fast), compiled=_compiled, cpu="cpu"
    )


def _meta_namespace() -> dict[str, Any]:
    # NOTE: ``cpu`` is "meta" here: a line materializing a meta input (``device=cpu``) stays on the
    # meta device the generator checks lines on.
    return _namespace(
        redist=lambda t, codes: t.clone(),
        full=lambda t: t.clone(),
        tied=_tied_meta,
        compiled=lambda fn: fn,
        cpu="meta",
    )


# --------------------------------------------------------------------------- the generator


@dataclass
class _Val:
    name: str
    meta: Any  # a meta tensor, or a tuple/list of them
    # "dt" (a DTensor), "plain" (a torch.Tensor), "seq" (a list/tuple of DTensors), "materialized"
    # (a DTensor moved off the meta device)
    kind: str


@dataclass
class _Gen:
    rng: random.Random
    mesh_shape: tuple[int, ...]
    sub_mesh: bool
    inputs: list[Input] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    vals: list[_Val] = field(default_factory=list)
    ns: dict[str, Any] = field(default_factory=_meta_namespace)
    count: int = 0
    input_names: list[str] = field(default_factory=list)
    meta_device: bool = False  # every input on the meta device
    allow_compile: bool = False  # this program may draw a compiled region
    context: str | None = None  # ``emit`` runs lines under ``with <context>:``
    suffix: str = ""  # ``emit`` appends this to a line run under ``context``
    done: bool = False  # a line expected to raise was emitted: nothing after it would run

    def fresh(self) -> str:
        name = f"t{self.count}"
        self.count += 1
        return name

    def dtype(self) -> str:
        return self.rng.choices(list(_DTYPES), weights=[10, 2, 2, 1, 0, 1])[0]

    def dim_size(self) -> int:
        return self.rng.choice([1, 2, 3, 4, 5, 6, 8])

    def shape(self, ndim: int | None = None) -> tuple[int, ...]:
        n = self.rng.choice([1, 2, 2, 2, 3]) if ndim is None else ndim
        return tuple(self.dim_size() for _ in range(n))

    def codes(self, ndim: int, dtype: str) -> tuple[str, ...]:
        options = ["R", "R"] + [f"S{d}" for d in range(ndim)] * 2
        if dtype in _GRADABLE:
            options += ["P", "P"]
        if dtype in _FLOATS:
            options += ["Pmax"]
        return tuple(self.rng.choice(options) for _ in self.mesh_shape)

    def never_empty(self, t: Any) -> bool:
        """No shard of ``t`` can be empty on this mesh, whatever its placements (torch.chunk splits
        n into ceil(n / k)-sized pieces, so some are empty when ceil(n / k) * (k - 1) >= n)."""
        counts = set(self.mesh_shape) | {math.prod(self.mesh_shape)}
        return all(-(-n // k) * (k - 1) < n for n in t.shape for k in counts if k > 1)

    def new_input(
        self,
        shape: tuple[int, ...] | None = None,
        dtype: str | None = None,
        *,
        high: int = 8,
        grad: bool | None = None,
    ) -> str:
        shape = self.shape() if shape is None else shape
        dtype = self.dtype() if dtype is None else dtype
        if dtype not in _DTYPES:  # a promoted value's (complex64 * float64 is complex128): its kind
            dtype = "complex64" if dtype.startswith("complex") else "float32"
        floating = dtype in _GRADABLE
        inp = Input(
            shape=shape,
            dtype=dtype,
            placements=self.codes(len(shape), dtype),
            requires_grad=floating and (self.rng.random() < 0.4 if grad is None else grad),
            noncontig=len(shape) >= 2 and self.rng.random() < 0.2,
            seed=self.rng.randrange(1 << 30),
            high=high,
            device="meta" if self.meta_device else "cpu",
        )
        name = self.fresh()
        self.inputs.append(inp)
        self.ns[name] = _meta_input(inp)
        self.vals.append(_Val(name, self.ns[name], "dt"))
        self.input_names.append(name)
        return name

    def pick(self, pred: Callable[[Any], bool] = lambda t: True) -> str | None:
        found = [v.name for v in self.vals if v.kind == "dt" and pred(v.meta)]
        return self.rng.choice(found) if found else None

    def pick_or_new(
        self, pred: Callable[[Any], bool], make: Callable[[], str], p_new: float = 0.3
    ) -> str:
        name = None if self.rng.random() < p_new else self.pick(pred)
        return make() if name is None else name

    def scalar(self, integral: bool = False) -> str:
        if integral or self.rng.random() < 0.25:
            return repr(self.rng.choice([-2, -1, 2, 3]))
        return repr(round(self.rng.uniform(-2.0, 2.0), 3) or 0.5)

    @contextlib.contextmanager
    def within(self, context: str | None) -> Iterator[None]:
        """Lines emitted inside run under ``context`` too (nested in the current one)."""
        outer = self.context
        if context is not None:
            self.context = context if outer is None else f"{outer}, {context}"
        try:
            yield
        finally:
            self.context = outer

    def emit(self, line: str, *, may_raise: bool = False) -> bool:
        """Run ``line`` (under ``with <context>:`` when set) on the meta namespace; keep it when it
        succeeds, or raises only because meta tensors have no data (``item``, ``equal``). With
        ``may_raise`` a line that raises is kept as the program's last (what raises is compared
        too)."""
        if self.done:
            return False
        if self.context is not None:
            line = f"with {self.context}: {line}{self.suffix}"
        before = dict(self.ns)
        try:
            # Factories in a line (a mask, a plain operand) make meta tensors here, CPU ones on
            # the ranks.
            with torch.device("meta"):
                exec(compile(line, "<fuzz>", "exec"), self.ns)
        except Exception as exc:
            self.ns.clear()
            self.ns.update(before)
            if _meta_only(exc):
                self.lines.append(line)
                return True
            if may_raise:
                self.lines.append(line)
                self.done = True
                return True
            return False
        known = {v.name for v in self.vals}
        fresh = [v for n, v in self.ns.items() if n not in before and isinstance(v, torch.Tensor)]
        if any(0 in v.shape for v in fresh):  # see AVOIDED
            self.ns.clear()
            self.ns.update(before)
            return False
        self.lines.append(line)
        for name, value in self.ns.items():
            if name.startswith("t") and name[1:].isdigit() and name not in known:
                if isinstance(value, torch.Tensor):
                    kind = "plain" if f"{name} = full(" in line else "dt"
                    if self.meta_device and "device=cpu" in line:
                        # NOTE: never an operand: a CPU value meeting a meta index (embedding,
                        # index_select) reads memory that does not exist, in plain torch too.
                        kind = "materialized"
                    self.vals.append(_Val(name, value, kind))
                elif isinstance(value, (list, tuple)) and all(
                    isinstance(x, torch.Tensor) for x in value
                ):
                    self.vals.append(_Val(name, value, "seq"))
        return True


def _meta_only(exc: Exception) -> bool:
    """``exc`` is raised on meta tensors only: the op needs data (``item``, ``equal``)."""
    text = str(exc)
    return "meta tensors" in text or "Meta tensors" in text


def _fp(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype.is_floating_point


def _cx(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype.is_complex


def _grad_dtype(t: Any) -> bool:
    return _fp(t) or _cx(t)


def _nd(n: int) -> Callable[[Any], bool]:
    return lambda t: t.ndim >= n


def _fp_nd(n: int) -> Callable[[Any], bool]:
    return lambda t: _fp(t) and t.ndim >= n


# Each op generator emits zero or more lines through ``_Gen.emit``, which keeps a line only when it
# runs on the meta namespace (global shapes, dtypes and autograd rules hold).
_Op = Callable[[_Gen], None]


def _op_unary(g: _Gen) -> None:
    a = g.pick_or_new(lambda t: True, g.new_input, 0.2)
    if _fp(g.ns[a]):
        fn = g.rng.choice(
            [
                "torch.relu",
                "torch.neg",
                "torch.exp",
                "torch.sigmoid",
                "torch.tanh",
                "torch.abs",
                "F.gelu",
                "torch.sin",
                "torch.square",
            ]
        )
    else:
        fn = g.rng.choice(["torch.neg", "torch.abs", "torch.square"])
    g.emit(f"{g.fresh()} = {fn}({a})")


def _op_scalar(g: _Gen) -> None:
    """Pointwise with a scalar, repeated with step-varying values (an optimizer's pattern)."""
    a = g.pick_or_new(lambda t: True, g.new_input, 0.2)
    form = g.rng.choice(
        [
            "{a} * {s}",
            "{a} + {s}",
            "{a} / {s}",
            "{s} - {a}",
            "{a} - {s}",
            "torch.clamp({a}, min={s})",
            "{a}.pow(2)",
            "torch.add({a}, {a}, alpha={s})",
        ]
    )
    for _ in range(g.rng.choice([1, 2, 3])):
        out = g.fresh()
        if g.emit(f"{out} = " + form.format(a=a, s=g.scalar())):
            a = out


def _broadcast_partner(g: _Gen, a: str) -> str:
    shape = tuple(g.ns[a].shape)
    dtype = g.rng.choice([str(g.ns[a].dtype).removeprefix("torch."), g.dtype()])
    choice = g.rng.random()
    if choice < 0.4:
        same = g.pick(lambda t: tuple(t.shape) == shape)
        if same is not None:
            return same
    if choice < 0.6 and shape:
        return g.new_input(shape[-1:], dtype)
    return g.new_input(shape, dtype)


def _op_binary(g: _Gen) -> None:
    a = g.pick_or_new(lambda t: True, g.new_input, 0.2)
    b = _broadcast_partner(g, a)
    if g.rng.random() < 0.5:
        a, b = b, a
    form = g.rng.choice(
        [
            "{a} + {b}",
            "{a} - {b}",
            "{a} * {b}",
            "{a} / {b}",
            "torch.maximum({a}, {b})",
            "torch.where({a} > 0, {a}, {b})",
            "{a} > {b}",
            "torch.sub({a}, {b}, alpha=2)",
        ]
    )
    g.emit(f"{g.fresh()} = " + form.format(a=a, b=b))


def _op_scalar_tensor(g: _Gen) -> None:
    a = g.pick_or_new(_fp, lambda: g.new_input(dtype="float32"), 0.2)
    g.emit(f"{g.fresh()} = {a} * torch.tensor({g.scalar()})")


def _op_reduce(g: _Gen) -> None:
    a = g.pick_or_new(_nd(1), g.new_input, 0.2)
    nd = g.ns[a].ndim
    d = g.rng.randrange(-nd, nd) if nd else 0
    forms = ["{a}.sum()", "{a}.sum({d})", "{a}.sum({d}, keepdim=True)", "torch.cumsum({a}, {d})"]
    if g.never_empty(g.ns[a]):  # see AVOIDED
        forms.append("{a}.amax({d})")
        if not g.sub_mesh:
            forms += ["{a}.max({d})", "{a}.argmax({d})"]
    if _fp(g.ns[a]):
        forms += [
            "{a}.mean()",
            "{a}.mean({d})",
            "torch.softmax({a}, {d})",
            "torch.log_softmax({a}, {d})",
            "{a}.norm()",
            "{a}.var({d})",
        ]
    g.emit(f"{g.fresh()} = " + g.rng.choice(forms).format(a=a, d=d))


def _factor(n: int, rng: random.Random) -> tuple[int, ...]:
    """A random shape with ``n`` elements (1 to 3 dims)."""
    dims: list[int] = []
    rest = n
    for _ in range(rng.choice([0, 1, 2])):
        divisors = [d for d in range(2, rest + 1) if rest % d == 0]
        if not divisors:
            break
        d = rng.choice(divisors)
        dims.append(d)
        rest //= d
    dims.append(rest)
    rng.shuffle(dims)
    return tuple(dims)


def _op_view(g: _Gen) -> None:
    a = g.pick_or_new(_nd(1), g.new_input, 0.2)
    t = g.ns[a]
    nd = t.ndim
    forms = [
        "{a}.view(-1)",
        "{a}.reshape({shape})",
        "{a}.view({shape})",
        "{a}.unsqueeze({d})",
        "{a}.flatten()",
        "{a}.contiguous()",
        "{a}[1:]",
        "{a}[::2]",
        "{a}[0]",
        "{a}.narrow({d}, 0, 1)",
        "{a}.squeeze()",
    ]
    if nd >= 2:
        forms += [
            "{a}.t()",
            "{a}.transpose(0, {d})",
            "{a}.permute({perm})",
            "{a}[:, 1:]",
            "{a}[..., 0]",
            "{a}.expand(2, *{a}.shape)",
            "{a}.unflatten(0, ({s0}, 1))",
            "{a}.mT",
        ]
    if any(s == 1 for s in t.shape):
        forms.append("{a}.expand({expanded})")
    perm = list(range(nd))
    g.rng.shuffle(perm)
    form = g.rng.choice(forms)
    g.emit(
        f"{g.fresh()} = "
        + form.format(
            a=a,
            d=g.rng.randrange(nd),
            shape=_factor(t.numel(), g.rng),
            perm=tuple(perm),
            s0=t.shape[0] if nd else 1,
            expanded=tuple(3 if s == 1 else s for s in t.shape),
        )
    )


def _op_seq(g: _Gen) -> None:
    a = g.pick_or_new(_nd(1), g.new_input, 0.2)
    t = g.ns[a]
    d = g.rng.randrange(t.ndim)
    kind = g.rng.choice(["cat", "stack", "split", "chunk", "unbind"])
    if kind in ("cat", "stack"):
        shape = list(t.shape)
        if kind == "cat":
            shape[d] = g.dim_size()
        b = g.pick_or_new(
            lambda u: tuple(u.shape) == tuple(shape) and u.dtype == t.dtype,
            lambda: g.new_input(tuple(shape), str(t.dtype).removeprefix("torch.")),
        )
        g.emit(f"{g.fresh()} = torch.{kind}([{a}, {b}], dim={d})")
        return
    out = g.fresh()
    if kind == "split":
        line = f"{out} = torch.split({a}, {g.rng.choice([1, 2, 3])}, dim={d})"
    elif kind == "chunk":
        line = f"{out} = torch.chunk({a}, {g.rng.choice([2, 3])}, dim={d})"
    else:
        line = f"{out} = torch.unbind({a}, dim={d})"
    if g.emit(line):
        g.emit(f"{g.fresh()} = {out}[-1]")


def _op_matmul(g: _Gen) -> None:
    kind = g.rng.choice(["mm", "matmul", "bmm", "addmm", "linear", "einsum"])
    dtype = g.rng.choice(["float32", "float32", "float64", "bfloat16"])

    def same(shape: tuple[int, ...]) -> Callable[[Any], bool]:
        return lambda u: tuple(u.shape) == shape and str(u.dtype) == f"torch.{dtype}"

    m, k, n = g.dim_size(), g.dim_size(), g.dim_size()
    a = g.pick_or_new(
        lambda u: u.ndim == 2 and str(u.dtype) == f"torch.{dtype}",
        lambda: g.new_input((m, k), dtype),
        0.4,
    )
    m, k = g.ns[a].shape
    if kind == "bmm":
        b_ = g.dim_size()
        x = g.new_input((b_, m, k), dtype)
        y = g.pick_or_new(same((b_, k, n)), lambda: g.new_input((b_, k, n), dtype))
        g.emit(f"{g.fresh()} = torch.bmm({x}, {y})")
        return
    if kind == "linear":
        w = g.pick_or_new(same((n, k)), lambda: g.new_input((n, k), dtype))
        bias = g.new_input((n,), dtype)
        if g.rng.random() < 0.4:  # a batch of sequences, as a transformer's projections see
            a = g.new_input((g.dim_size(), m, k), dtype)
        g.emit(f"{g.fresh()} = F.linear({a}, {w}, {bias})")
        return
    if kind == "einsum":
        x = g.new_input((g.dim_size(), m, k), dtype)
        w = g.pick_or_new(same((n, k)), lambda: g.new_input((n, k), dtype))
        form = g.rng.choice(["'bmk,nk->bmn'", "'bmk,nk->bnm'"])
        g.emit(f"{g.fresh()} = torch.einsum({form}, {x}, {w})")
        return
    b = g.pick_or_new(same((k, n)), lambda: g.new_input((k, n), dtype))
    if kind == "addmm":
        bias = g.new_input(g.rng.choice([(n,), (m, n)]), dtype)
        g.emit(f"{g.fresh()} = torch.addmm({bias}, {a}, {b})")
    elif kind == "matmul":
        g.emit(f"{g.fresh()} = {a} @ {b}")
    else:
        g.emit(f"{g.fresh()} = torch.mm({a}, {b})")


def _op_index(g: _Gen) -> None:
    a = g.pick_or_new(_nd(1), g.new_input, 0.2)
    t = g.ns[a]
    d = g.rng.randrange(t.ndim)
    form = g.rng.choice(["torch.index_select({a}, {d}, {i})", "{a}[{i}]"])
    d = d if "index_select" in form else 0
    idx = g.new_input((g.rng.choice([1, 2, 3, 4]),), "int64", high=max(1, t.shape[d]))
    g.emit(f"{g.fresh()} = " + form.format(a=a, d=d, i=idx))


def _op_inplace(g: _Gen) -> None:
    a = g.pick_or_new(lambda t: True, g.new_input, 0.2)
    t = g.ns[a]
    out = g.fresh()
    kind = g.rng.choice(["scalar", "tensor", "unary", "out"])
    if kind == "scalar":
        form = g.rng.choice(
            [
                "{a}.mul_({s})",
                "{a}.add_({s})",
                "{a}.fill_({s})",
                "{a}.clamp_(min={s})",
                "{a}.div_({s})",
                "{a}[0].mul_({s})",
                "{a}.t().add_({s})" if t.ndim == 2 else "{a}[-1:].sub_({s})",
            ]
        )
        g.emit(f"{out} = " + form.format(a=a, s=g.scalar()))
    elif kind == "unary":
        g.emit(f"{out} = {a}." + g.rng.choice(["zero_()", "relu_()", "neg_()", "abs_()"]))
    elif kind == "tensor":
        b = _broadcast_partner(g, a)
        form = g.rng.choice(
            ["{a}.add_({b})", "{a}.mul_({b})", "{a}.copy_({b})", "{a}.sub_({b}, alpha=2)"]
        )
        g.emit(f"{out} = " + form.format(a=a, b=b))
    else:
        b = _broadcast_partner(g, a)
        o = g.pick_or_new(
            lambda u: tuple(u.shape) == tuple(t.shape),
            lambda: g.new_input(tuple(t.shape), grad=False),
            0.5,
        )
        fn = g.rng.choice(["torch.add", "torch.mul", "torch.sub"])
        g.emit(f"{out} = {fn}({a}, {b}, out={o})")


def _op_foreach(g: _Gen) -> None:
    xs = [
        g.pick_or_new(_fp, lambda: g.new_input(dtype="float32"), 0.3)
        for _ in range(g.rng.choice([2, 3]))
    ]
    lst = "[" + ", ".join(xs) + "]"
    kind = g.rng.choice(
        ["add_scalar", "mul_", "add_list", "norm", "lerp_", "addcmul_", "scalar_list", "add_alpha_"]
    )
    out = g.fresh()
    if kind == "add_scalar":
        g.emit(f"{out} = torch._foreach_add({lst}, {g.scalar()})")
    elif kind == "mul_":
        g.emit(f"torch._foreach_mul_({lst}, {g.scalar()})")
    elif kind == "scalar_list":
        g.emit(f"{out} = torch._foreach_mul({lst}, [{', '.join(g.scalar() for _ in xs)}])")
    elif kind == "norm":
        g.emit(f"{out} = torch._foreach_norm({lst})")
    else:
        ys = "[" + ", ".join(_broadcast_partner_same(g, x) for x in xs) + "]"
        if kind == "add_list":
            g.emit(f"{out} = torch._foreach_add({lst}, {ys})")
        elif kind == "lerp_":
            g.emit(f"torch._foreach_lerp_({lst}, {ys}, {g.scalar()})")
        elif kind == "addcmul_":
            g.emit(f"torch._foreach_addcmul_({lst}, {ys}, {ys}, value={g.scalar()})")
        else:
            g.emit(f"torch._foreach_add_({lst}, {ys}, alpha={g.scalar()})")


def _broadcast_partner_same(g: _Gen, a: str) -> str:
    t = g.ns[a]
    return g.pick_or_new(
        lambda u: tuple(u.shape) == tuple(t.shape) and u.dtype == t.dtype,
        lambda: g.new_input(tuple(t.shape), str(t.dtype).removeprefix("torch."), grad=False),
    )


def _op_redistribute(g: _Gen) -> None:
    a = g.pick_or_new(lambda t: True, g.new_input, 0.1)
    t = g.ns[a]
    codes = g.codes(t.ndim, "int64" if not _fp(t) else "float32")
    g.emit(f"{g.fresh()} = redist({a}, {codes!r})")


def _op_random(g: _Gen) -> None:
    a = g.pick_or_new(_fp, lambda: g.new_input(dtype="float32"), 0.2)
    out = g.fresh()
    form = g.rng.choice(
        [
            "F.dropout({a}, 0.5, training=True)",
            "torch.rand_like({a})",
            "torch.randn_like({a})",
            "{a}.normal_()",
            "{a}.uniform_()",
            "torch.bernoulli(torch.sigmoid({a}))",
        ]
    )
    g.emit(f"{out} = " + form.format(a=a))


def _op_convert(g: _Gen) -> None:
    a = g.pick_or_new(lambda t: True, g.new_input, 0.2)
    form = g.rng.choice(
        [
            "{a}.to(torch.float64)",
            "{a}.float()",
            "{a}.to(torch.bfloat16)",
            "torch.zeros_like({a})",
            "torch.ones_like({a})",
            "torch.full_like({a}, {s})",
            "{a}.clone()",
            "full({a})",
            "{a}.detach()",
            "{a}.detach().requires_grad_()" if _fp(g.ns[a]) else "{a}.detach()",
            # see AVOIDED
            "{a}.clone()" if g.meta_device and g.sub_mesh else "torch.equal({a}, {a}.clone())",
            "{a}.sum().item()",
            "torch.zeros_like({a}, device=cpu)",  # materializes a meta input
            "torch.empty_like({a}, device=cpu).fill_({s})",
        ]
    )
    g.emit(f"{g.fresh()} = " + form.format(a=a, s=g.scalar()))


def _op_nn(g: _Gen) -> None:
    a = g.pick_or_new(_fp_nd(2), lambda: g.new_input(g.shape(g.rng.choice([2, 3])), "float32"), 0.3)
    t = g.ns[a]
    last = t.shape[-1]
    kind = g.rng.choice(["layer_norm", "layer_norm_affine", "cross_entropy", "mse"])
    if kind == "layer_norm":
        g.emit(f"{g.fresh()} = F.layer_norm({a}, ({last},))")
    elif kind == "layer_norm_affine":
        w = g.new_input((last,), str(t.dtype).removeprefix("torch."))
        b = g.new_input((last,), str(t.dtype).removeprefix("torch."))
        g.emit(f"{g.fresh()} = F.layer_norm({a}, ({last},), {w}, {b})")
    elif kind == "cross_entropy" and t.ndim == 2:
        target = g.new_input((t.shape[0],), "int64", high=last)
        if g.rng.random() < 0.4 and g.never_empty(t):  # see AVOIDED
            # torch's vocab-parallel loss (its handlers are registered when the context is entered)
            if g.rng.random() < 0.5:
                target = f"full({target})"
            with g.within("loss_parallel()"):
                g.emit(f"{g.fresh()} = F.cross_entropy({a}, {target})")
        else:
            g.emit(f"{g.fresh()} = F.cross_entropy({a}, {target})")
    else:
        b = _broadcast_partner_same(g, a)
        g.emit(f"{g.fresh()} = F.mse_loss({a}, {b})")


def _op_embedding(g: _Gen) -> None:
    """A lookup into a (often vocab-sharded) table; with repeats, several lookups alive at once."""
    vocab, dim = g.rng.choice([4, 6, 8]), g.dim_size()
    w = g.pick_or_new(
        lambda u: u.ndim == 2 and _fp(u), lambda: g.new_input((vocab, dim), "float32"), 0.5
    )
    idx = g.new_input((g.rng.choice([2, 3, 4]),), "int64", high=g.ns[w].shape[0])
    g.emit(f"{g.fresh()} = F.embedding({idx}, {w})")


def _op_repeat(g: _Gen) -> None:
    """An earlier line again under a new name (a cache hit inside the first run)."""
    assigned = [line for line in g.lines if re.match(r"t\d+ = ", line)]
    if assigned:
        line = g.rng.choice(assigned)
        g.emit(f"{g.fresh()} = " + line.split(" = ", 1)[1])


_ASSIGNED = re.compile(r"(t\d+) = (.*)")


def _assigned(g: _Gen) -> list[re.Match[str]]:
    """Earlier plain assignments (no ``with``): (name, right-hand side)."""
    return [m for m in map(_ASSIGNED.fullmatch, g.lines) if m is not None]


def _body(line: str) -> str:
    """``line`` without its ``with <context>:`` prefix and its suffix statements."""
    if line.startswith("with "):
        line = line.split(": ", 1)[1]
    return line.split("; ", 1)[0]


# The ambient states a call may run under, with weights. A program switches between them from
# line to line, and repeats lines across them, so a plan made under one is looked up under another.
_MATMUL = re.compile(r"@|torch\.(mm|bmm|addmm|einsum)\(|F\.linear\(")

_CONTEXTS: tuple[tuple[str, int], ...] = (
    ("torch.no_grad()", 3),
    ("torch.inference_mode()", 2),
    ("torch.autocast('cpu', dtype=torch.bfloat16)", 3),
    ("torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad()", 1),
    ("DispatchMode()", 1),
    ("FunctionMode()", 1),
    ("CommDebugMode() as cm", 1),
)


def _op_ambient(g: _Gen) -> None:
    """A call under another ambient state (grad mode, inference mode, autocast, a torch mode):
    an earlier line again or a new op; then maybe the same call again outside it, and an in-place
    op outside inference mode on an inference tensor (which raises)."""
    contexts, weights = zip(*_CONTEXTS, strict=True)
    context = g.rng.choices(contexts, weights=weights)[0]
    # CommDebugMode: the counts of the collectives the call ran are a value compared like others.
    g.suffix = f"; {g.fresh()} = cm.get_comm_counts()" if " as cm" in context else ""
    before = len(g.lines)
    try:
        with g.within(context):
            earlier = _assigned(g)
            if "autocast" in context:  # what autocast changes: matmuls run in bfloat16
                earlier = [m for m in earlier if _MATMUL.search(m.group(2))]
            if earlier and g.rng.random() < 0.7:
                g.emit(f"{g.fresh()} = {g.rng.choice(earlier).group(2)}")
            elif "autocast" in context and g.rng.random() < 0.7:
                _op_matmul(g)
            else:
                ops, op_weights = zip(*_BASE_OPS, strict=True)
                g.rng.choices(ops, weights=op_weights)[0](g)
    finally:
        g.suffix = ""
    if len(g.lines) == before:
        return
    body = _ASSIGNED.fullmatch(_body(g.lines[-1]))
    if body is None:
        return
    if g.rng.random() < 0.5:
        g.emit(f"{g.fresh()} = {body.group(2)}")
    if "inference_mode" in context and g.rng.random() < 0.3:
        op = g.rng.choice(["add_(1)", "mul_(2)", "zero_()"])
        g.emit(f"{g.fresh()} = {body.group(1)}.{op}", may_raise=True)


def _op_complex(g: _Gen) -> None:
    """Complex values: conjugate views, view_as_real/complex, complex products (rotary
    embeddings), FFTs."""
    kind = g.rng.choice(["unary", "binary", "binary", "rotary", "view_as_complex", "ihfft"])
    if kind in ("rotary", "view_as_complex", "ihfft"):
        half = g.rng.choice([1, 2, 3])
        shape = (g.dim_size(), 2 * half)
        ihfft = kind == "ihfft"  # never on a tensor that requires grad: see AVOIDED
        x = g.pick_or_new(
            lambda u: tuple(u.shape) == shape
            and u.dtype == torch.float32
            and not (ihfft and u.requires_grad),
            lambda: g.new_input(shape, "float32", grad=False if ihfft else None),
            0.5,
        )
        if kind == "rotary":
            f = g.new_input((half,), "complex64")
            g.emit(
                f"{g.fresh()} = torch.view_as_real("
                f"torch.view_as_complex({x}.reshape({shape[0]}, {half}, 2)) * {f}).flatten(-2)"
            )
        elif kind == "view_as_complex":
            g.emit(f"{g.fresh()} = torch.view_as_complex({x}.reshape({shape[0]}, {half}, 2))")
        else:
            g.emit(f"{g.fresh()} = torch.fft.ihfft({x})")
        return
    c = g.pick_or_new(_cx, lambda: g.new_input(dtype="complex64"), 0.4)
    if kind == "unary":
        form = g.rng.choice(
            [
                "{c}.conj()",
                "{c}.conj().resolve_conj()",
                "torch.conj_physical({c})",
                "{c}.conj().neg()",
                "torch.view_as_real({c})",
                "{c}.real",
                "{c}.imag",
                "{c}.abs()",
                "torch.angle({c})",
                "torch.fft.fft({c})",
                "torch.fft.ifft({c})",
                "torch.fft.hfft({c})",
            ]
        )
        g.emit(f"{g.fresh()} = " + form.format(c=c))
        return
    d = _broadcast_partner(g, c)
    form = g.rng.choice(["{c} * {d}", "{c} * {d}.conj()", "{c}.conj() + {d}", "{c}.conj() * {d}"])
    g.emit(f"{g.fresh()} = " + form.format(c=c, d=d))


def _plain_operand(g: _Gen, shape: tuple[int, ...], dtype: str) -> str:
    """A plain tensor expression of ``shape`` (what ``implicit_replication`` admits)."""
    numel = math.prod(shape)
    return g.rng.choice(
        [
            f"torch.ones({shape}, dtype=torch.{dtype})",
            f"torch.full({shape}, {g.scalar()}, dtype=torch.{dtype})",
            f"torch.arange({numel}, dtype=torch.{dtype}).reshape({shape})",
        ]
    )


def _op_implicit(g: _Gen) -> None:
    """DTensors with plain tensors under ``implicit_replication()`` (an attention mask added to
    scores); in programs that allow it, inside a ``torch.compile`` region (once per program)."""
    a = g.pick_or_new(_fp_nd(1), lambda: g.new_input(dtype="float32"), 0.3)
    t = g.ns[a]
    dtype = str(t.dtype).removeprefix("torch.")
    if t.ndim == 2 and g.rng.random() < 0.4:
        b = _broadcast_partner_same(g, a)
        mask = f"torch.triu(torch.full(({t.shape[0]}, {t.shape[0]}), -1e4, dtype=torch.{dtype}), 1)"
        body = f"{a} @ {b}.mT + {mask}"
    else:
        keep = g.rng.randint(1, t.ndim)
        plain = _plain_operand(g, tuple(t.shape)[-keep:], dtype)
        body = g.rng.choice(["{a} + {p}", "{a} * {p}", "{p} - {a}", "({a} + {p}).sum()"])
        body = body.format(a=a, p=plain)
    if g.allow_compile:
        g.allow_compile = False
        names = ", ".join(dict.fromkeys(_NAME.findall(body)))
        body = f"compiled(lambda {names}: {body})({names})"
    context = g.rng.choice(
        ["implicit_replication()"] * 3 + ["implicit_replication(), torch.no_grad()"]
    )
    with g.within(context):
        g.emit(f"{g.fresh()} = {body}")


def _op_checkpoint(g: _Gen) -> None:
    """An earlier call again inside activation checkpointing (reentrant or not)."""
    earlier = [m for m in _assigned(g) if _NAME.search(m.group(2))]
    if earlier:
        rhs = g.rng.choice(earlier).group(2)
        names = ", ".join(dict.fromkeys(_NAME.findall(rhs)))
        reentrant = g.rng.choice([True, False])
        g.emit(
            f"{g.fresh()} = checkpoint(lambda {names}: {rhs}, {names}, use_reentrant={reentrant})"
        )


def _op_tied(g: _Gen) -> None:
    """A module with an embedding and a head sharing one Parameter, trained one step (``tied``)."""
    vocab = g.rng.choice([4, 6, 8])
    w = g.new_input((vocab, g.dim_size()), "float32", grad=False)
    if not g.never_empty(g.ns[w]):  # see AVOIDED
        return
    idx = g.new_input((g.rng.choice([2, 3, 4]),), "int64", high=vocab)
    g.emit(f"{g.fresh()} = tied({w}, {idx})")


_BASE_OPS: tuple[tuple[_Op, float], ...] = (
    (_op_nn, 1),
    (_op_embedding, 1),
    (_op_repeat, 2),
    (_op_unary, 3),
    (_op_scalar, 3),
    (_op_binary, 4),
    (_op_scalar_tensor, 1),
    (_op_reduce, 3),
    (_op_view, 4),
    (_op_seq, 2),
    (_op_matmul, 3),
    (_op_index, 1),
    (_op_inplace, 3),
    (_op_foreach, 2),
    (_op_redistribute, 2),
    (_op_random, 1),
    (_op_convert, 2),
    (_op_complex, 2),
    (_op_implicit, 1),
)
_OPS: tuple[tuple[_Op, float], ...] = (
    *_BASE_OPS,
    (_op_ambient, 6),
    (_op_checkpoint, 1),
    (_op_tied, 0.5),
)
# Programs that run on the meta device, and that may compile a region (compiling costs seconds).
_META_RATE = 0.04
_COMPILE_RATE = 0.01


def _meshes_for(world_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(mesh name, mesh shape) for a world size."""
    if world_size == 4:
        return [("1d", (4,)), ("2d", (2, 2)), ("sub:0,1,2", (3,)), ("sub:1,3", (2,))]
    if world_size == 1:
        return [("1d", (1,))]
    return [
        ("1d", (world_size,)),
        ("sub:0", (1,)),
        (f"sub:{','.join(map(str, range(world_size - 1)))}", (world_size - 1,)),
    ]


def generate(seed: int, index: int, *, world_size: int, impls: Sequence[str]) -> Program:
    """Program number ``index`` of ``seed`` for ``world_size`` ranks: the same on every call."""
    rng = random.Random(f"dtdispatch-fuzz:{seed}:{index}:{world_size}")
    mesh, mesh_shape = rng.choice(_meshes_for(world_size))
    g = _Gen(rng=rng, mesh_shape=mesh_shape, sub_mesh=mesh.startswith("sub:"))
    g.meta_device = rng.random() < _META_RATE
    g.allow_compile = rng.random() < _COMPILE_RATE
    for _ in range(rng.choice([1, 1, 2])):
        g.new_input()
    ops, weights = zip(*_OPS, strict=True)
    steps = rng.randint(2, 8)
    for step in range(steps):
        if g.allow_compile and step == steps // 2:
            _op_implicit(g)
        rng.choices(ops, weights=weights)[0](g)
    _add_backward(g)
    return _renumber(
        Program(
            mesh, impls[index % len(impls)], tuple(g.inputs), tuple(g.lines), rng.randrange(1 << 30)
        ),
        g.input_names,
    )


def _add_backward(g: _Gen) -> None:
    """A backward through one or two values: ``.backward()``, ``torch.autograd.backward`` or
    ``torch.autograd.grad``, sometimes called with grad mode off (as reentrant checkpointing does)
    or inside ``loss_parallel`` when the program used it."""
    if g.rng.random() < 0.3:
        return
    grads = [
        v.name for v in g.vals if v.kind == "dt" and _grad_dtype(v.meta) and v.meta.requires_grad
    ]
    if not grads:
        return
    chosen = g.rng.sample(grads, min(len(grads), g.rng.choice([1, 2])))
    loss = " + ".join(f"{n}.abs().sum()" if _cx(g.ns[n]) else f"{n}.float().sum()" for n in chosen)
    entry = g.rng.choices(["backward", "autograd.backward", "grad"], weights=[6, 1, 2])[0]
    contexts = []
    if g.rng.random() < 0.25:
        contexts.append("torch.no_grad()")
    if any("loss_parallel" in line for line in g.lines) and g.rng.random() < 0.5:
        contexts.append("loss_parallel()")
    leaves = [n for n in g.input_names if g.ns[n].requires_grad]
    if entry == "backward" and not contexts:
        g.emit(f"({loss}).backward()")
        return
    total = g.fresh()
    if not g.emit(f"{total} = {loss}"):
        return
    if entry == "grad" and leaves:
        chosen_leaves = ", ".join(g.rng.sample(leaves, min(len(leaves), g.rng.choice([1, 2]))))
        call = f"{g.fresh()} = torch.autograd.grad({total}, [{chosen_leaves}], allow_unused=True)"
    elif entry == "autograd.backward":
        call = f"torch.autograd.backward({total})"
    else:
        call = f"{total}.backward()"
    with g.within(", ".join(contexts) or None):
        g.emit(call)


_NAME = re.compile(r"\bt\d+\b")


def _renumber(program: Program, input_names: list[str]) -> Program:
    """Inputs become t0..t(k-1) and the lines' names follow, so a program reads top to bottom."""
    mapping = {name: f"t{i}" for i, name in enumerate(input_names)}
    k = len(input_names)
    for line in program.lines:
        for name in _NAME.findall(line):
            if name not in mapping:
                mapping[name] = f"t{k}"
                k += 1
    lines = tuple(_NAME.sub(lambda m: mapping[m.group(0)], line) for line in program.lines)
    return replace(program, lines=lines)


def _compact(program: Program) -> Program:
    """``program`` without the inputs no line uses, names renumbered densely."""
    used = {name for line in program.lines for name in _NAME.findall(line)}
    keep = [i for i in range(len(program.inputs)) if f"t{i}" in used]
    compact = replace(program, inputs=tuple(program.inputs[i] for i in keep))
    return _renumber(compact, [f"t{i}" for i in keep])


# --------------------------------------------------------------------------- the runner


@dataclass
class _Outcome:
    ns: dict[str, Any]
    line: int | None  # the line some rank raised on (every rank stopped there)
    exc: BaseException | None  # this rank's exception on that line, if any


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _run(program: Program, cls: type[DTensor], mesh: DeviceMesh) -> _Outcome:
    fast = cls is not DTensor
    ns = _real_namespace(fast)
    if any("compiled(" in line for line in program.lines):
        import torch._dynamo as dynamo

        # Each run compiles afresh (the lines' code objects are new anyway); reset frees the last.
        dynamo.reset()
        if fast:
            _tensor.prepare_compile()
    for i, inp in enumerate(program.inputs):
        ns[f"t{i}"] = make_input(cls, mesh, inp)
    torch.manual_seed(program.rng_seed)
    dt_random._rng_tracker = None
    handlers = DTensor._op_dispatcher._custom_op_handlers
    before = dict(handlers)
    try:
        for k, line in enumerate(program.lines):
            exc: BaseException | None = None
            try:
                exec(compile(line, f"<fuzz line {k}>", "exec"), ns)
            except Exception as e:  # compared by type with stock's
                exc = e
            if _any_rank(exc is not None):
                return _Outcome(ns, k, exc)
        return _Outcome(ns, None, None)
    finally:
        # NOTE: torch's loss_parallel() enables its handlers and disables them after its body with
        # no try/finally: a body that raises (on one rank only, for some shardings) leaves them on,
        # and later programs then diverge between ranks (a collective mismatch aborts gloo).
        handlers.clear()
        handlers.update(before)


def _compare(stock: Any, fast: Any, where: str) -> None:
    if isinstance(stock, DTensor):
        if type(fast) not in FAST_TYPES:
            raise AssertionError(f"{where}: expected FastDTensor, got {type(fast).__name__}")
        if _placements_key(stock) != _placements_key(fast):
            raise AssertionError(
                f"{where}: placements {fast.placements} != stock {stock.placements}"
            )
        if stock.device_mesh != fast.device_mesh:
            raise AssertionError(f"{where}: mesh {fast.device_mesh} != stock {stock.device_mesh}")
        _compare_meta(stock, fast, where + " global")
        _compare(stock._local_tensor, fast._local_tensor, where + " local")
    elif isinstance(stock, torch.Tensor):
        if not isinstance(fast, torch.Tensor) or isinstance(fast, DTensor):
            raise AssertionError(f"{where}: expected a plain tensor, got {type(fast).__name__}")
        _compare_meta(stock, fast, where)
        if stock.device.type != "meta" and not torch.equal(_bits(stock), _bits(fast)):
            raise AssertionError(f"{where}: values differ:\n{fast}\nstock:\n{stock}")
    elif isinstance(stock, (list, tuple)):
        if type(stock) is not type(fast) or len(stock) != len(fast):
            raise AssertionError(f"{where}: {type(fast).__name__} of {len(fast)} != stock's")
        for i, (s, f) in enumerate(zip(stock, fast, strict=True)):
            _compare(s, f, f"{where}[{i}]")
    elif stock != fast and not (stock != stock and fast != fast):  # NaN == NaN here
        raise AssertionError(f"{where}: {fast!r} != stock {stock!r}")


def _placements_key(t: DTensor) -> tuple[tuple[type, str], ...]:
    # NOTE: by type and repr, not ==: _MaskPartial's == also compares its per-call mask buffer,
    # which differs between any two runs (stock's and dtdispatch's) even when both are right.
    return tuple((type(p), repr(p)) for p in t.placements)


def _tensor_meta(t: torch.Tensor) -> tuple[Any, ...]:
    return (
        tuple(t.shape),
        t.stride(),
        t.dtype,
        t.device.type,
        t.requires_grad,
        t.is_conj(),
        t.is_neg(),
        t.is_inference(),
        t._is_view(),
    )


def _compare_meta(stock: torch.Tensor, fast: torch.Tensor, where: str) -> None:
    got, want = _tensor_meta(fast), _tensor_meta(stock)
    if got != want:
        raise AssertionError(
            f"{where}: shape/stride/dtype/device/requires_grad/conj/neg/inference/view "
            f"{got} != stock {want}"
        )


def _names(ns: dict[str, Any]) -> list[str]:
    return sorted(
        (n for n in ns if n.startswith("t") and n[1:].isdigit()), key=lambda n: int(n[1:])
    )


def _excluded(stock: _Outcome) -> str | None:
    """Why this rank's stock run is not to be compared (an ``EXCLUSIONS`` entry), or None."""
    if stock.exc is None:
        return None
    raised_in = {f.name for f in traceback.extract_tb(stock.exc.__traceback__)}
    for needle, exc_type, function, why in EXCLUSIONS:
        if (
            needle in str(stock.exc)
            and type(stock.exc).__name__ == exc_type
            and (not function or function in raised_in)
        ):
            return why
    return None


def _outcome_text(outcome: _Outcome) -> str:
    """"no error", or the line, the exception and where it was raised (the innermost frame: a
    failure that needs a long history to reproduce says where it comes from)."""
    if outcome.line is None:
        return "no error"
    exc = outcome.exc
    frames = traceback.extract_tb(exc.__traceback__) if exc is not None else []
    text = f"line {outcome.line} {type(exc).__name__}: {exc}"
    if frames:
        text += f" (raised in {frames[-1].name}, {frames[-1].filename}:{frames[-1].lineno})"
    return text


def _diff(program: Program, stock: _Outcome, fast: _Outcome, label: str) -> str | None:
    """The first difference between two runs on this rank, or None."""
    if stock.line != fast.line or type(stock.exc) is not type(fast.exc):
        return f"{label}: dtdispatch {_outcome_text(fast)}; stock {_outcome_text(stock)}"
    names = _names(stock.ns)
    try:
        if names != _names(fast.ns):
            raise AssertionError(f"names {_names(fast.ns)} != stock {names}")
        for name in names:
            _compare(stock.ns[name], fast.ns[name], name)
        for i in range(len(program.inputs)):
            name = f"t{i}"
            s_in, f_in = stock.ns[name], fast.ns[name]
            if s_in.is_leaf != f_in.is_leaf:  # an in-place op with a grad-requiring operand
                raise AssertionError(f"{name}.is_leaf {f_in.is_leaf} != stock {s_in.is_leaf}")
            if s_in.is_leaf:
                _compare(s_in.grad, f_in.grad, f"{name}.grad")
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if (stock.ns[a] is stock.ns[b]) != (fast.ns[a] is fast.ns[b]):
                    raise AssertionError(
                        f"{a} is {b}: dtdispatch {fast.ns[a] is fast.ns[b]}, "
                        f"stock {stock.ns[a] is stock.ns[b]}"
                    )
    except Exception as exc:  # a comparison that cannot even run is a difference too
        return f"{label}: {exc}"
    return None


def _runs(program: Program) -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """The dtdispatch runs: (label, set-up, tear-down)."""

    def nothing() -> None:
        pass

    def cap1() -> None:
        dtdispatch.clear_cache()
        dtdispatch.set_cache_capacity(1)

    capacity = _cache._default_capacity

    def restore() -> None:
        dtdispatch.set_cache_capacity(capacity)

    yield "plan", dtdispatch.clear_cache, nothing
    yield "replay", nothing, nothing
    yield "capacity 1", cap1, restore


HANG_S = 100.0
"""A program still running after this many seconds is taken for a deadlock (ranks waiting in
different collectives): ``failure`` prints it as a script to stderr and exits the process, before
gloo's own 120 s timeout ends the run without saying which program it was."""


def _on_hang(program: Program) -> None:
    sys.stderr.write(
        f"dtdispatch fuzz: rank {dist.get_rank()}: a program ran past {HANG_S:.0f} s (ranks "
        f"deadlocked in different collectives?); exiting. The program:\n{render(program)}\n"
    )
    sys.stderr.flush()
    os._exit(3)


def failure(program: Program) -> str | None:
    """Run ``program`` on stock and on dtdispatch (plan, replay, capacity 1); the first difference
    on any rank as text (the same on every rank), or None. Collective. A program that hangs
    (``HANG_S``) ends the process with it printed."""
    watchdog = threading.Timer(HANG_S, _on_hang, (program,))
    watchdog.daemon = True
    watchdog.start()
    try:
        return _failure(program)
    finally:
        watchdog.cancel()


def _failure(program: Program) -> str | None:
    mesh = mesh_for(program.mesh)
    previous = dispatcher.active()
    dispatcher.install(program.impl)
    found: str | None = None
    try:
        # NOTE: torch's sharding caches outlive a program, and its C++ one keys a Python scalar
        # operand as a 0-d Replicate DTensor of its dtype: after ``p + q`` (q such a DTensor),
        # stock replays the Partial output for ``p + 1.5`` and adds the scalar on every rank (a
        # wrong value; the other order raises). Cleared, each program's stock run is what it is in
        # a fresh process, so a failure reproduces alone (ARCHITECTURE "Where dtdispatch differs
        # from stock on purpose").
        _compat.clear_sharding_caches()
        stock = _run(program, DTensor, mesh)
        if _any_rank(_excluded(stock) is not None):
            return None
        for label, set_up, tear_down in _runs(program):
            set_up()
            try:
                fast = _run(program, FastDTensor, mesh)
            finally:
                tear_down()
            found = _diff(program, stock, fast, f"{program.impl} {label}")
            if _any_rank(found is not None):
                break
    finally:
        dispatcher.install(previous)
    return _first_report(found)


def _first_report(found: str | None) -> str | None:
    """Every rank's report, joined (the same text on every rank), or None."""
    reports: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, found)
    lines = [f"rank {rank}: {report}" for rank, report in enumerate(reports) if report is not None]
    return "\n".join(lines) if lines else None


def check(program: Program) -> None:
    """Raise AssertionError (with a shrunk, runnable reproduction) when ``program`` differs."""
    found = failure(program)
    if found is not None:
        small = shrink(program)
        raise AssertionError(f"{found}\n\nminimal reproduction:\n{render(small)}")


# --------------------------------------------------------------------------- shrinking


_AVOIDED_OPS = re.compile(r"\.(amax|max|argmax)\(")


def _candidates(program: Program) -> Iterator[Program]:
    """Smaller or simpler variants of ``program``, the most aggressive first."""
    lines = program.lines
    n = len(lines)
    chunk = max(1, n // 2)
    while chunk >= 1:
        for start in range(0, n, chunk):
            yield replace(program, lines=lines[:start] + lines[start + chunk :])
        chunk //= 2
    for k, line in enumerate(lines):
        if line.startswith("with "):  # the same call outside its ambient state
            yield replace(program, lines=(*lines[:k], _body(line), *lines[k + 1 :]))
    # NOTE: smaller shapes can leave a shard empty, where what AVOIDED lists makes stock itself
    # deadlock or run mismatched collectives; the generator drew those ops on never-empty shards.
    empty_shard_hazard = any(_AVOIDED_OPS.search(line) for line in lines)
    if any(inp.device == "meta" for inp in program.inputs):
        # NOTE: all inputs at once: a meta index into a CPU table reads memory that does not exist
        # (plain torch's index_select returns garbage), so a program mixing the two fails
        # spuriously.
        yield replace(program, inputs=tuple(replace(inp, device="cpu") for inp in program.inputs))
    for i, inp in enumerate(program.inputs):
        simpler = [
            replace(inp, requires_grad=False),
            replace(inp, noncontig=False),
            replace(inp, placements=("R",) * len(inp.placements)),
            replace(inp, placements=tuple("P" if c == "Pmax" else c for c in inp.placements)),
            replace(inp, dtype="float32") if inp.dtype in _FLOATS else inp,
        ]
        if not empty_shard_hazard:
            simpler += [
                replace(inp, shape=tuple(min(s, 4) for s in inp.shape)),
                replace(inp, shape=tuple(min(s, 2) for s in inp.shape)),
            ]
        for code_i, code in enumerate(inp.placements):
            if code != "R":
                codes = list(inp.placements)
                codes[code_i] = "R"
                simpler.append(replace(inp, placements=tuple(codes)))
        for s in simpler:
            if s != inp:
                inputs = list(program.inputs)
                inputs[i] = s
                yield replace(program, inputs=tuple(inputs))
    if program.mesh not in ("1d",) and program.mesh != "2d":
        yield replace(program, mesh="1d")


def shrink(program: Program, *, budget_s: float = 60.0) -> Program:
    """A smaller program that still fails (greedy delta debugging). Collective."""
    deadline = time.monotonic() + budget_s
    progress = True
    while progress and _agree(time.monotonic() < deadline):
        progress = False
        for candidate in _candidates(program):
            if not _agree(time.monotonic() < deadline):
                break
            if failure(candidate) is not None:
                program = candidate
                progress = True
                break
    compact = _compact(program)
    return compact if compact != program and failure(compact) is not None else program


def _agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (time-based decisions must not diverge)."""
    t = torch.tensor([1 if flag else 0])
    dist.broadcast(t, src=0)
    return bool(t.item())


def render(program: Program, *, world_size: int | None = None) -> str:
    """``program`` as a script runnable under torchrun on ``world_size`` ranks (default: this
    process group's size); it exits non-zero on a difference, and importing it only defines
    ``program``."""
    world = dist.get_world_size() if world_size is None else world_size
    inputs = "".join(f"        {inp!r},\n" for inp in program.inputs)
    lines = "".join(f"        {line!r},\n" for line in program.lines)
    return (
        f"# torchrun --standalone --nproc-per-node {world} repro.py\n"
        "import torch.distributed as dist\n\n"
        "from dtdispatch.testing.fuzz import Input, Program, failure\n\n"
        "program = Program(\n"
        f"    mesh={program.mesh!r},\n"
        f"    impl={program.impl!r},\n"
        f"    inputs=(\n{inputs}    ),\n"
        f"    lines=(\n{lines}    ),\n"
        f"    rng_seed={program.rng_seed!r},\n"
        ")\n\n"
        'if __name__ == "__main__":\n'
        '    dist.init_process_group("gloo")\n'
        "    found = failure(program)\n"
        "    dist.destroy_process_group()\n"
        "    if found:\n"
        "        raise SystemExit(found)\n"
    )


# --------------------------------------------------------------------------- the driver


_FEATURES: tuple[tuple[str, str], ...] = (
    ("autocast", "torch.autocast("),
    ("no_grad", "torch.no_grad()"),
    ("inference_mode", "torch.inference_mode()"),
    ("DispatchMode", "DispatchMode()"),
    ("FunctionMode", "FunctionMode()"),
    ("CommDebugMode", "CommDebugMode()"),
    ("conj", "conj"),
    ("view_as_real/complex", "view_as_"),
    ("fft", "torch.fft."),
    ("autograd.grad", "torch.autograd.grad("),
    ("autograd.backward", "torch.autograd.backward("),
    ("tied", "tied("),
    ("implicit_replication", "implicit_replication()"),
    ("compiled", "compiled("),
    ("checkpoint", "checkpoint("),
    ("loss_parallel", "loss_parallel()"),
)


def features(program: Program) -> set[str]:
    """The drawn features ``program`` uses, by name (for tallies and reports)."""
    text = "\n".join(program.lines)
    found = {name for name, needle in _FEATURES if needle in text}
    if any(inp.dtype == "complex64" for inp in program.inputs) or "view_as_complex" in text:
        found.add("complex")
    if any(inp.device == "meta" for inp in program.inputs):
        found.add("meta")
    if re.search(r"^with [^:]*no_grad\(\)[^:]*: .*(backward\(|autograd\.grad\()", text, re.M):
        found.add("autograd entry under no_grad")
    return found


def fuzz(
    seed: int,
    *,
    count: int | None = None,
    seconds: float | None = None,
    impls: Sequence[str] | None = None,
    start: int = 0,
    shrink_s: float = 60.0,
    compile_share: float = 0.25,
    tally: dict[str, int] | None = None,
    trace: Callable[[int, Program], None] | None = None,
) -> tuple[int, list[str]]:
    """Run programs ``start, start+1, ...`` of ``seed`` until ``count`` ran or ``seconds`` passed
    (rank 0's clock decides). Returns (programs run, failure reports with shrunk reproductions).

    A program with a compiled region is skipped (counted as run) while compiled programs have
    taken more than ``compile_share`` of the time so far: compiling costs seconds. ``tally``, when
    given, counts programs per drawn feature (``features``), the skipped ones under
    "compiled (skipped)", and the failing ones under "failing: <feature>". ``trace``, when given,
    is called with each program's index and the program before it runs (a collective mismatch
    aborts gloo without a report). Collective."""
    if count is None and seconds is None:
        raise ValueError("fuzz needs count= or seconds= (got neither)")
    from dtdispatch import _native as native

    impls = sorted(native.implementations()) if impls is None else list(impls)
    began = time.monotonic()
    deadline = None if seconds is None else began + seconds
    world = dist.get_world_size()
    failures: list[str] = []
    compile_s = 0.0
    tally = {} if tally is None else tally
    index = start
    while count is None or index - start < count:
        if deadline is not None and not _agree(time.monotonic() < deadline):
            break
        program = generate(seed, index, world_size=world, impls=impls)
        drawn = features(program)
        index += 1
        compiled = "compiled" in drawn
        if compiled and not _agree(compile_s <= compile_share * (time.monotonic() - began)):
            tally["compiled (skipped)"] = tally.get("compiled (skipped)", 0) + 1
            continue
        for name in drawn:
            tally[name] = tally.get(name, 0) + 1
        if trace is not None:
            trace(index - 1, program)
        program_began = time.monotonic()
        found = failure(program)
        if compiled:
            compile_s += time.monotonic() - program_began
        if found is not None:
            for name in drawn or {"(none)"}:
                tally[f"failing: {name}"] = tally.get(f"failing: {name}", 0) + 1
            small = shrink(program, budget_s=shrink_s)
            failures.append(f"seed {seed} program {index - 1}: {found}\n{render(small)}")
    return index - start, failures
