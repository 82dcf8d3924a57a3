"""Conformance from torch's OpInfo database: every sample of ``op_db`` on stock DTensor and on
dtdispatch, compared bitwise, as torch's own DTensor op tests do (``test_dtensor_ops.py``).

For one op, every dtype torch declares for it on CPU (``DTYPES`` bounds the set), each sample
(``max_samples`` of them), each sharding of its tensor arguments (``max_shardings``: all Replicate,
then each tensor argument sharded on each evenly divisible dim, as torch's ``DTensorConverter``
draws them), the call runs:

- forward, no argument requiring grad: once on stock DTensor, then on FastDTensor under each
  configuration (implementation x path above dispatch on/off), twice each (the plan, then its
  replay);
- forward and backward, where the op supports autograd and the dtype is floating or complex:
  forward with the differentiable tensors as leaves, then ``torch.autograd.grad`` with a fixed
  gradient of each output's placements (Partial outputs get a Replicate one), once on stock, once
  per implementation (the path above dispatch never replays a call whose argument requires grad,
  so it is on for these runs).

Compared: outputs (type, placements, global shape, stride, dtype, ``requires_grad``, ``_is_view``,
conj/neg bits, local bytes), the inputs after the call (in-place ops), the gradients, and the
exception type where stock raises. Random ops run under the same seed with a fresh RNG tracker for
both; ops whose result is uninitialized memory are skipped (``SKIPPED``, with the reason).

Where stock is wrong and dtdispatch is right (ARCHITECTURE 'Where dtdispatch differs from stock on
purpose'): stock raises because its sharding cache cannot hash a complex scalar, or returns a spec
whose global shape or dtype disagrees with the call (its key leaves out an argument that decides
it). There the outcome is checked against the op on plain tensors instead: accepted only when
dtdispatch's result agrees with it (shapes and dtypes exactly, values with
``torch.testing.assert_close``) and, where stock returned, stock's global shape or dtype does not.

The first difference of a sharding ends that sharding (its later configurations do not run).

Known failures (``KNOWN_FAILURES``) are tolerated and counted; every other difference fails.
Every rank builds the same samples from the same seed, so setting up needs no communication.
"""

from __future__ import annotations

import os
import re
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed.tensor._random as dt_random
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Placement
from torch.utils import _pytree as pytree

import dtdispatch
from dtdispatch import FastDTensor
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch._tensor import FAST_TYPES
from dtdispatch.testing._bits import bits as _bits
from dtdispatch.testing._bits import placement_fields

__all__ = [
    "CI_OPS",
    "DTYPES",
    "KNOWN_FAILURES",
    "SKIPPED",
    "Report",
    "all_op_ids",
    "run_op",
]

SEED = 0

# The dtypes run: every dtype torch declares for an op, within this set. Left out: complex32,
# the float8 types and uint16/32/64 (a few ops each; most DTensor collectives do not take them
# on gloo, and they share every code path dtdispatch has with the dtypes below).
DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64,
    torch.complex128, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)

# Ops not run at all, with the reason. Nothing here hides a difference from stock.
SKIPPED: dict[str, str] = {
    # Their results are uninitialized memory: bytes differ run to run on stock alone.
    "empty": "uninitialized memory",
    "empty_like": "uninitialized memory",
    "empty_strided": "uninitialized memory",
    "empty_permuted": "uninitialized memory",
    "new_empty": "uninitialized memory",
    "new_empty_strided": "uninitialized memory",
    "resize_": "uninitialized memory (grows the storage)",
    "resize_as_": "uninitialized memory (grows the storage)",
    # Factories without a tensor argument never reach DTensor.
    "arange": "no tensor argument", "eye": "no tensor argument", "full": "no tensor argument",
    "linspace": "no tensor argument", "linspace.tensor_overload": "no tensor argument",
    "logspace": "no tensor argument", "logspace.tensor_overload": "no tensor argument",
    "ones": "no tensor argument", "zeros": "no tensor argument", "randn": "no tensor argument",
    "randint": "no tensor argument", "scalar_tensor": "no tensor argument",
    "broadcast_shapes": "no tensor argument",
    # No sample within DTYPES on CPU.
    "torch._scaled_mm": "float8 only", "torch._scaled_mm_v2": "float8 only",
    "torch.ops.aten._flash_attention_forward": "CUDA only: no CPU sample",
    "torch.ops.aten._efficient_attention_forward": "CUDA only: no CPU sample",
    "nn.functional.batch_norm.without_cudnn": "no CPU sample",
    # torch's own DTensor op test skips it too: its samples break under the test sizes (L, M, S).
    "argwhere": "its sample inputs raise IndexError under torch's DTensor test sizes",
}


@dataclass(frozen=True)
class Known:
    """A tolerated failure: a regex the op id (``name`` or ``name.variant``) fully matches, a regex
    the failure message matches, the reason. ``dtypes`` None: any dtype."""

    op: str
    pattern: str
    reason: str
    dtypes: tuple[torch.dtype, ...] | None = None


# NOTE: each entry is a real difference from stock, tolerated so that the rest of the database
# keeps checking; delete an entry as soon as its cause is fixed (``DTDISPATCH_OPINFO_STRICT=1``
# ignores this list, to see what is left).
KNOWN_FAILURES: list[Known] = [
    Known("_unsafe_masked_index",
          r"dtdispatch raised NotImplementedError.*stock raised RuntimeError: unhashable type",
          "torch registers no sharding strategy for it (both raise NotImplementedError on every "
          "other dtype); with a complex fill value stock raises earlier, hashing the scalar, "
          "which dtdispatch does not key by value (the declared deviation)",
          (torch.complex64, torch.complex128)),
    Known(r"nn\.functional\.conv(_transpose)?[123]d",
          r"dtdispatch returned, stock raised RuntimeError: unhashable type",
          "stock's convolution rule gives an input sharded on a spatial dim a wrong output shape "
          "(every dtype; dtdispatch returns stock's result bitwise). For complex dtypes stock "
          "raises earlier, on a complex scalar its cache cannot hash, which dtdispatch keys by "
          "type (the declared deviation), so dtdispatch returns that wrong result where stock "
          "raises", (torch.complex64, torch.complex128)),
]


def _op_id(op: Any) -> str:
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


_DB: dict[str, Any] = {}


def _op_db() -> dict[str, Any]:
    """op id -> OpInfo, with torch's test sizes (its DTensor op test shrinks them so that sample
    shapes shard evenly)."""
    if not _DB:
        import torch.testing._internal.common_methods_invocations as common_ops

        vars(common_ops).update(L=24, M=12, S=4, XS=2)
        for op in common_ops.op_db:
            _DB[_op_id(op)] = op
    return _DB


def all_op_ids() -> list[str]:
    """Every op id of ``op_db`` that is not in ``SKIPPED``, in database order."""
    return [name for name in _op_db() if name not in SKIPPED]


# The fixed sample CI runs: ops of every family (pointwise, reductions, matmul, views, indexing,
# nn, complex-only paths, random, int/bool), each on float32 and the dtypes named here (where the
# op supports them), so that the sample covers every dtype of ``DTYPES`` within CI's time budget.
_t = torch
CI_OPS: dict[str, tuple[torch.dtype, ...]] = {
    "add": (_t.bfloat16,), "mul": (_t.complex64,), "sub": (_t.int64,),
    "div.no_rounding_mode": (_t.float16,), "neg": (_t.int8,), "abs": (_t.complex128,),
    "exp": (_t.float64,), "sigmoid": (_t.bfloat16,), "where": (_t.bool,), "clamp": (_t.int32,),
    "pow": (_t.complex64,), "eq": (_t.bool,), "logical_and": (_t.bool,),
    "bitwise_and": (_t.uint8, _t.bool), "sum": (_t.int16,), "mean": (_t.complex64,),
    "amax": (_t.uint8,), "argmax": (_t.int64,), "mm": (_t.complex64,), "bmm": (_t.bfloat16,),
    "matmul": (_t.float64,), "addmm": (_t.complex64,), "nn.functional.linear": (_t.bfloat16,),
    "view": (_t.bool,), "reshape": (_t.complex128,), "transpose": (_t.int16,),
    "permute": (_t.uint8,), "unsqueeze": (_t.bool,), "expand": (_t.int8,), "cat": (_t.bool,),
    "stack": (_t.complex64,), "split": (_t.int32,), "index_select": (_t.float16,),
    "gather": (_t.int64,), "masked_fill": (_t.bool,), "softmax": (_t.float64,),
    "nn.functional.layer_norm": (_t.bfloat16,), "nn.functional.gelu": (_t.bfloat16,),
    "nn.functional.embedding": (_t.bfloat16,), "nn.functional.dropout": (_t.float64,),
    "bernoulli": (_t.float64,), "conj": (_t.complex64,), "real": (_t.complex128,),
    "view_as_real": (_t.complex64,), "topk": (_t.int64,), "cumsum": (_t.int32,),
    "zeros_like": (_t.bool,), "to": (_t.complex64,), "clone": (_t.bool,), "fill": (_t.bfloat16,),
}


@dataclass
class Failure:
    op: str
    dtype: torch.dtype
    where: str  # sample index, sharding, configuration, phase
    message: str
    known: Known | None = None


@dataclass
class Report:
    """What ``run_op`` did: counts per outcome and the failures."""

    op: str
    counts: Counter[str] = field(default_factory=Counter)
    dtypes: set[torch.dtype] = field(default_factory=set)
    failures: list[Failure] = field(default_factory=list)
    deviations: list[str] = field(default_factory=list)  # where stock was wrong, dtdispatch right

    def unexpected(self) -> list[Failure]:
        return [f for f in self.failures if f.known is None]

    def summary(self) -> str:
        lines = [f"{self.op}: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))]
        for f in self.failures:
            tag = f"known ({f.known.reason})" if f.known else "FAIL"
            lines.append(f"  {tag} [{f.dtype}] {f.where}: {f.message}")
        return "\n".join(lines)


class Mismatch(AssertionError):
    """A difference from stock; the message says where."""


# ---------------------------------------------------------------------------------------------
# Comparison


def _same_tensor(stock: torch.Tensor, fast: torch.Tensor, where: str) -> None:
    for what, s, f in (
        ("shape", stock.shape, fast.shape),
        ("stride", stock.stride(), fast.stride()),
        ("dtype", stock.dtype, fast.dtype),
        ("conj bit", stock.is_conj(), fast.is_conj()),
        ("neg bit", stock.is_neg(), fast.is_neg()),
    ):
        if s != f:
            raise Mismatch(f"{where}: {what} {f} != stock {s}")
    if not torch.equal(_bits(stock), _bits(fast)):
        raise Mismatch(f"{where}: local bytes differ")


def compare(stock: Any, fast: Any, where: str) -> None:
    """Raise ``Mismatch`` unless ``fast`` is bitwise ``stock`` (FastDTensor for DTensor)."""
    if isinstance(stock, DTensor):
        if type(fast) not in FAST_TYPES:
            raise Mismatch(f"{where}: expected FastDTensor, got {type(fast).__name__}")
        for what, s, f in (
            ("placements", [placement_fields(p) for p in stock.placements],
             [placement_fields(p) for p in fast.placements]),
            ("global shape", stock.shape, fast.shape),
            ("global stride", stock.stride(), fast.stride()),
            ("dtype", stock.dtype, fast.dtype),
            ("requires_grad", stock.requires_grad, fast.requires_grad),
            ("_is_view()", stock._is_view(), fast._is_view()),
        ):
            if s != f:
                raise Mismatch(f"{where}: {what} {f} != stock {s}")
        _same_tensor(stock._local_tensor, fast._local_tensor, where + " local")
    elif isinstance(stock, torch.Tensor):
        if not isinstance(fast, torch.Tensor) or isinstance(fast, DTensor):
            raise Mismatch(f"{where}: expected a plain tensor, got {type(fast).__name__}")
        _same_tensor(stock, fast, where)
    elif isinstance(stock, (list, tuple)):
        if type(stock) is not type(fast) or len(stock) != len(fast):
            raise Mismatch(f"{where}: structure {type(fast).__name__} != stock "
                           f"{type(stock).__name__}")
        for i, (s, f) in enumerate(zip(stock, fast, strict=True)):
            compare(s, f, f"{where}[{i}]")
    elif isinstance(stock, float) and isinstance(fast, float):
        if repr(stock) != repr(fast):  # bitwise enough for floats: nan == nan, -0.0 != 0.0
            raise Mismatch(f"{where}: {fast!r} != stock {stock!r}")
    elif type(stock) is not type(fast) or stock != fast:
        raise Mismatch(f"{where}: {fast!r} != stock {stock!r}")


# ---------------------------------------------------------------------------------------------
# Inputs


def _supported(t: torch.Tensor) -> bool:
    """torch's ``DTensorConverter.is_supported_tensor``: what DTensor can wrap."""
    return not (t.is_sparse or t.is_sparse_csr or t.is_mkldnn or t.is_quantized or t.is_nested
                or t.is_neg() or t.is_conj() or t.device.type != "cpu"
                or type(t) not in (torch.Tensor, torch.nn.Parameter))


def _choices(t: torch.Tensor, size: int) -> list[Placement]:
    """torch's ``DTensorConverter.gen_sharding_choices_for_arg``: Replicate, then Shard(d) for
    every dim evenly divisible by the mesh size (bool tensors only Replicate; 0-d tensors are
    always replicated)."""
    choices: list[Placement] = [Replicate()]
    if t.dtype != torch.bool and t.ndim > 0:
        choices += [Shard(d) for d, s in enumerate(t.shape) if s > 1 and s % size == 0]
    return choices


def shardings(
    tensors: Sequence[torch.Tensor], size: int, limit: int
) -> list[tuple[Placement, ...]]:
    """At most ``limit`` placement tuples: all Replicate first, then each tensor argument on each
    of its shard choices (the others Replicate), then every tensor on its first shard choice."""
    choices = [_choices(t, size) for t in tensors]
    base = tuple(Replicate() for _ in tensors)
    out: list[tuple[Placement, ...]] = [base]
    for i, cs in enumerate(choices):
        for c in cs[1:]:
            out.append((*base[:i], c, *base[i + 1:]))
    if len(tensors) > 1:
        every = tuple(cs[1] if len(cs) > 1 else cs[0] for cs in choices)
        if every not in out:
            out.append(every)
    return out[:limit]


@dataclass
class Sample:
    """One OpInfo sample, flattened: tensors are the leaves that DTensor will wrap."""

    index: int
    leaves: list[Any]
    spec: pytree.TreeSpec
    differentiable: list[bool]  # per leaf: a floating/complex tensor the sample wants a grad for
    dtype: torch.dtype


def _seed(seed: int) -> None:
    """The CPU generator only: ``torch.manual_seed`` also seeds every lazily initialized
    accelerator, capturing a stack each time (10 ms per call, a third of this module's time)."""
    torch.default_generator.manual_seed(seed)


def _samples(op: Any, dtype: torch.dtype, grad: bool, limit: int) -> Iterator[Sample]:
    _seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = op.sample_inputs("cpu", dtype, requires_grad=grad)
        for index, s in enumerate(it):
            if index >= limit:
                return
            leaves, spec = pytree.tree_flatten(((s.input, *s.args), dict(s.kwargs)))
            diff = [isinstance(x, torch.Tensor) and x.requires_grad for x in leaves]
            leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
            yield Sample(index, leaves, spec, diff, dtype)


def _wrap(base: Any, cls: type[DTensor], requires_grad: bool) -> Any:
    local = base._local_tensor.clone()
    return torch.Tensor._dtensor__new__(cls, local, base._spec, requires_grad=requires_grad)


def _distribute(sample: Sample, mesh: DeviceMesh, placements: Sequence[Placement]) -> list[Any]:
    """Stock DTensors for the sample's tensor leaves (no communication: every rank holds the
    global value)."""
    out: list[Any] = []
    it = iter(placements)
    for x in sample.leaves:
        if isinstance(x, torch.Tensor):
            p = next(it)
            out.append(distribute_tensor(x, mesh, [p if x.ndim else Replicate()],
                                         src_data_rank=None))
        else:
            out.append(x)
    return out


def _make(sample: Sample, dist: list[Any], cls: type[DTensor], grad: bool) -> list[Any]:
    return [_wrap(d, cls, grad and diff) if isinstance(d, DTensor) else d
            for d, diff in zip(dist, sample.differentiable, strict=True)]


# ---------------------------------------------------------------------------------------------
# Running


def _call(op: Any, sample: Sample, leaves: list[Any]) -> tuple[Any, BaseException | None]:
    """The op on ``leaves`` under a fixed seed and a fresh DTensor RNG tracker."""
    args, kwargs = pytree.tree_unflatten(leaves, sample.spec)
    _seed(SEED + 1)
    dt_random._rng_tracker = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return op.op(*args, **kwargs), None
    except Exception as exc:  # compared by type
        return None, exc


def _same_raise(stock: BaseException | None, fast: BaseException | None, where: str) -> bool:
    """True when either raised (nothing more to compare); Mismatch when they disagree."""
    if stock is None and fast is None:
        return False
    if type(stock) is not type(fast):
        raise Mismatch(f"{where}: dtdispatch {'raised ' + _short(fast) if fast else 'returned'}, "
                       f"stock {'raised ' + _short(stock) if stock else 'returned'}")
    return True


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _what(stock_exc: BaseException | None) -> str:
    if stock_exc is not None:
        return "stock raised " + _short(stock_exc)
    return "stock's global shape or dtype disagrees with plain tensors"


def _full(x: Any) -> Any:
    return x.full_tensor() if isinstance(x, DTensor) else x


def _plain_run(op: Any, sample: Sample, grad: bool) -> tuple[Any, BaseException | None]:
    """The op (and its gradients, when ``grad``) on plain tensors: the reference where stock is
    wrong."""
    inputs = [x.clone().requires_grad_(grad and d) if isinstance(x, torch.Tensor) else x
              for x, d in zip(sample.leaves, sample.differentiable, strict=True)]
    out, exc = _call(op, sample, inputs)
    if exc is not None or not grad:
        return out, exc
    outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not outs or not leaves:
        return out, None
    gen = torch.Generator().manual_seed(SEED + 2)
    gouts = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in outs]
    try:
        return (out, list(torch.autograd.grad(outs, leaves, gouts, allow_unused=True))), None
    except Exception as e:
        return None, e


def _close_to(ref: Any, got: Any) -> bool:
    """``got`` (DTensors gathered) has the plain result's structure, shapes, dtypes and values."""
    ref_l, got_l = pytree.tree_leaves(ref), pytree.tree_leaves(got)
    if len(ref_l) != len(got_l):
        return False
    for r, g in zip(ref_l, got_l, strict=True):
        if not isinstance(r, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or (g.shape, g.dtype) != (r.shape, r.dtype):
            return False
        try:
            torch.testing.assert_close(_full(g).detach(), r.detach(), equal_nan=True)
        except AssertionError:
            return False
    return True


# What stock raises where its sharding cache cannot hash a Python scalar it keys by value (a
# complex one); dtdispatch keys pointwise ops' scalars by type (the declared deviation).
_STOCK_UNHASHABLE = re.compile(r"unhashable type")


def _stock_is_wrong(op: Any, sample: Sample, stock: Any, stock_exc: BaseException | None,
                    fast: Any, grad: bool) -> bool:
    """The declared deviation: stock raised its unhashable-scalar error, or its global metadata
    disagrees with the op on plain tensors; and dtdispatch's result agrees with plain tensors.
    Collective (``full_tensor``): call on every rank."""
    if stock_exc is not None and not _STOCK_UNHASHABLE.search(str(stock_exc)):
        return False
    ref, ref_exc = _plain_run(op, sample, grad)
    if ref_exc is not None:
        return False
    if stock_exc is None:
        ref_meta = [(r.shape, r.dtype) for r in pytree.tree_leaves(ref)
                    if isinstance(r, torch.Tensor)]
        stock_meta = [(s.shape, s.dtype) for s in pytree.tree_leaves(stock)
                      if isinstance(s, torch.Tensor)]
        if ref_meta == stock_meta:
            return False
    return _close_to(ref, fast)


def _judge(op: Any, sample: Sample, stock: tuple[Any, BaseException | None],
           fast: tuple[Any, BaseException | None], backward: bool, here: str, what: str,
           report: Report) -> bool:
    """One run (result, exception) against stock's: True when the results are the same; False,
    counted in ``report``, when both raised alike or stock is wrong and dtdispatch right (checked
    on plain tensors); else raise ``Mismatch``."""
    (stock_out, stock_exc), (fast_out, fast_exc) = stock, fast
    try:
        if _same_raise(stock_exc, fast_exc, here):
            report.counts["raised like stock"] += 1
            return False
        compare(stock_out, fast_out, here + what)
    except Mismatch:
        if fast_exc is None and _stock_is_wrong(
                op, sample, stock_out, stock_exc, fast_out, backward):
            report.counts["stock wrong, dtdispatch right"] += 1
            report.deviations.append(f"[{sample.dtype}] {here}: {_what(stock_exc)}")
            return False
        raise
    return True


CONFIGS: list[tuple[str, bool]] = [(impl, above) for impl in sorted(native.implementations())
                                   for above in (True, False)]


def _forward(op: Any, sample: Sample, dist: list[Any], where: str,
             configs: Sequence[tuple[str, bool]], report: Report) -> None:
    stock_in = _make(sample, dist, DTensor, False)
    stock_out, stock_exc = _call(op, sample, stock_in)
    for impl, above in configs:
        dispatcher.install(impl, above=above)
        for attempt in ("plan", "replay"):
            here = f"{where} {impl} above={'on' if above else 'off'} forward {attempt}"
            fast_in = _make(sample, dist, FastDTensor, False)
            fast_out, fast_exc = _call(op, sample, fast_in)
            if not _judge(op, sample, (stock_out, stock_exc), (fast_out, fast_exc), False,
                          here, " output", report):
                continue
            for i, (s, f) in enumerate(zip(stock_in, fast_in, strict=True)):
                compare(s, f, f"{here} argument {i} after the call")
            report.counts["forward passed"] += 1


def _grad_outputs(outs: list[Any], mesh: DeviceMesh, cls: type[DTensor]) -> list[Any]:
    gen = torch.Generator().manual_seed(SEED + 2)
    grads = []
    for o in outs:
        value = torch.randn(o.shape, dtype=o.dtype, generator=gen)
        placements = [Replicate() if isinstance(p, Partial) else p for p in o.placements]
        g = distribute_tensor(value, mesh, placements, src_data_rank=None)
        grads.append(_wrap(g, cls, False))
    return grads


def _backward_run(op: Any, sample: Sample, dist: list[Any], mesh: DeviceMesh,
                  cls: type[DTensor]) -> tuple[Any, BaseException | None]:
    inputs = _make(sample, dist, cls, True)
    out, exc = _call(op, sample, inputs)
    if exc is not None:
        return None, exc
    outs = [o for o in pytree.tree_leaves(out)
            if isinstance(o, DTensor) and o.requires_grad]
    leaves = [x for x in inputs if isinstance(x, DTensor) and x.requires_grad]
    if not outs or not leaves:
        return (out, None), None
    try:
        grads = torch.autograd.grad(outs, leaves, _grad_outputs(outs, mesh, cls),
                                    allow_unused=True)
    except Exception as e:
        return None, e
    return (out, list(grads)), None


def _backward(op: Any, sample: Sample, dist: list[Any], mesh: DeviceMesh, where: str,
              impls: Sequence[str], report: Report) -> None:
    stock, stock_exc = _backward_run(op, sample, dist, mesh, DTensor)
    for impl in impls:
        dispatcher.install(impl, above=True)
        here = f"{where} {impl} backward"
        fast, fast_exc = _backward_run(op, sample, dist, mesh, FastDTensor)
        if _judge(op, sample, (stock, stock_exc), (fast, fast_exc), True,
                  here, " (output, grads)", report):
            report.counts["backward passed"] += 1


def _known(op_id: str, dtype: torch.dtype, message: str) -> Known | None:
    if os.environ.get("DTDISPATCH_OPINFO_STRICT", "") == "1":
        return None
    for k in KNOWN_FAILURES:
        if re.fullmatch(k.op, op_id) and (k.dtypes is None or dtype in k.dtypes) and re.search(
                k.pattern, message):
            return k
    return None


def run_op(op_id: str | Any, mesh: DeviceMesh, *, dtypes: Sequence[torch.dtype] | None = None,
           max_samples: int = 4, max_shardings: int = 4,
           configs: Sequence[tuple[str, bool]] | None = None,
           backward: bool = True, log: Callable[[str], None] | None = None) -> Report:
    """Run one op of ``op_db`` on stock and dtdispatch; every difference lands in the report.

    Call on every rank of ``mesh`` in the same order (the calls communicate). Leaves dtdispatch
    installed with the default implementation and the path above dispatch on. ``op_id`` may also
    be an OpInfo-like object (``op``, ``sample_inputs``, ``supported_dtypes``,
    ``supported_backward_dtypes``, ``supports_autograd``, ``name``, ``variant_test_name``).
    """
    if isinstance(op_id, str):
        op = _op_db()[op_id]
    else:
        op, op_id = op_id, _op_id(op_id)
    configs = list(CONFIGS if configs is None else configs)
    impls = sorted({impl for impl, _ in configs})
    report = Report(op_id)
    size = mesh.size()
    wanted = DTYPES if dtypes is None else tuple(dtypes)
    supported = op.supported_dtypes("cpu")
    try:
        for dtype in [d for d in wanted if d in supported]:
            report.dtypes.add(dtype)
            grad = (backward and op.supports_autograd
                    and dtype in op.supported_backward_dtypes("cpu"))
            for sample in _samples(op, dtype, grad, max_samples):
                tensors = [x for x in sample.leaves if isinstance(x, torch.Tensor)]
                if not tensors or not all(_supported(t) for t in tensors):
                    report.counts["sample not wrappable"] += 1
                    continue
                report.counts["samples"] += 1
                for placements in shardings(tensors, size, max_shardings):
                    where = (f"sample {sample.index} "
                             f"[{', '.join(str(p) for p in placements)}] ws{size}")
                    report.counts["shardings"] += 1
                    dist = _distribute(sample, mesh, placements)
                    try:
                        _forward(op, sample, dist, where, configs, report)
                        if grad and any(sample.differentiable):
                            _backward(op, sample, dist, mesh, where, impls, report)
                    except Exception as exc:  # a Mismatch, or dtdispatch's own crash
                        msg = str(exc) if isinstance(exc, Mismatch) else (
                            f"{where}: crashed: {_short(exc)}\n{traceback.format_exc()}")
                        known = _known(op_id, dtype, msg)
                        report.failures.append(Failure(op_id, dtype, where, msg, known))
                        report.counts["known failure" if known else "failed"] += 1
                        if log is not None:
                            log(f"{op_id} [{dtype}] {msg.splitlines()[0][:400]}")
    finally:
        dispatcher.install(native.DEFAULT)
        dtdispatch.clear_cache()
    return report


def ci_dtypes(op_id: str) -> list[torch.dtype]:
    """CI's dtypes for an op of ``CI_OPS``: float32 and the ones named there, where the op
    supports them; else its first supported dtype of ``DTYPES``."""
    supported = _op_db()[op_id].supported_dtypes("cpu")
    picked = [d for d in (torch.float32, *CI_OPS[op_id]) if d in supported]
    return picked or [next(d for d in DTYPES if d in supported)]


def selection() -> list[tuple[str, dict[str, Any]]]:
    """(op id, ``run_op`` options) pairs: the fixed CI sample, or with ``DTDISPATCH_OPINFO=all``
    the whole database on every dtype. ``DTDISPATCH_OPINFO_SAMPLES`` / ``_SHARDINGS`` override the
    caps (1 sample per dtype, 2 shardings), ``DTDISPATCH_OPINFO_DTYPES`` (comma-separated names,
    e.g. ``float32,int64``) the dtypes, ``DTDISPATCH_OPINFO_FROM`` (an op id) starts the
    database there (to resume a run)."""
    env = os.environ.get
    full = env("DTDISPATCH_OPINFO", "") == "all"
    ops = all_op_ids() if full else list(CI_OPS)
    start = env("DTDISPATCH_OPINFO_FROM")
    if start:
        ops = ops[ops.index(start):]
    base: dict[str, Any] = {
        "max_samples": int(env("DTDISPATCH_OPINFO_SAMPLES", 1)),
        "max_shardings": int(env("DTDISPATCH_OPINFO_SHARDINGS", 2)),
    }
    names = env("DTDISPATCH_OPINFO_DTYPES")
    if names:
        base["dtypes"] = [getattr(torch, n.strip()) for n in names.split(",")]
    out = []
    for op in ops:
        opts = dict(base)
        if not full and not names:
            opts["dtypes"] = ci_dtypes(op)
        out.append((op, opts))
    return out


def summarize(lines: Sequence[str]) -> str:
    """The summary ``make opinfo`` prints from its log: ops, dtypes, samples, outcomes, and the
    failures grouped by class (the message with sample, sharding and values left out)."""
    import json

    ops: set[str] = set()
    dtypes: set[str] = set()
    counts: Counter[str] = Counter()
    classes: Counter[tuple[str, str]] = Counter()
    class_ops: dict[tuple[str, str], set[str]] = {}
    failed_ops: set[str] = set()
    deviation_ops: Counter[str] = Counter()
    for line in lines:
        r = json.loads(line)
        ops.add(r["op"])
        dtypes.update(r["dtypes"])
        counts.update({f"{k} (ws{r['ws']})": v for k, v in r["counts"].items()})
        if r.get("deviations"):
            deviation_ops[r["op"]] += len(r["deviations"])
        for f in r["failures"]:
            first = f["message"].splitlines()[0] if f["message"] else ""
            text = re.sub(r"^sample \d+ \[[^\]]*\] ws\d+ ", "", first)
            text = re.sub(r"\(_MaskPartial.*?\)\)", "(...)", text)[:160]
            key = (f["known"] or "unexpected", text)
            classes[key] += 1
            class_ops.setdefault(key, set()).add(r["op"])
            if not f["known"]:
                failed_ops.add(r["op"])
    out = [f"ops: {len(ops)} ({len(failed_ops)} with unexpected failures), dtypes: "
           f"{len(dtypes)} ({', '.join(sorted(dtypes))})"]
    out += [f"  {k}: {v}" for k, v in sorted(counts.items())]
    out.append("stock wrong, dtdispatch right (checked against plain tensors), per op: "
               + ", ".join(f"{k} {v}" for k, v in sorted(deviation_ops.items())))
    out.append("failure classes (count, ops):")
    for (known, text), n in classes.most_common():
        names = sorted(class_ops[(known, text)])
        out.append(f"  {n:6d} [{known}] {text}\n         ops: {', '.join(names[:12])}"
                   + (f" (+{len(names) - 12})" if len(names) > 12 else ""))
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    with open(sys.argv[1]) as f:
        print(summarize(f.readlines()))
