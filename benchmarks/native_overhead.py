"""Per-op dispatch cost: stock DTensor vs FastDTensor (Python twin) vs FastDTensor (C extension).

Not a test. World size 1 (gloo, file store), 8x8 float32 Shard(0) (``mm``: Shard(0) x Replicate),
one thread, interleaved batches so that machine noise hits every variant alike. Prints the median µs
per op call of each variant and its ratio to stock. Each op runs twice: without autograd, and
"+grad" (inputs require grad, grad mode on; forward only, the graph is dropped).

"floor" is a minimal Python ``__torch_dispatch__`` (unwrap, call ``OpOverload._op``, wrap; no key,
no cache, no counting): what entering Python, calling an ``OpOverload`` and building a DTensor cost
by themselves. "floor-pub" is the same handler calling the public torch function of the overload
(``torch._C._VariableFunctions.<name>``) instead of ``OpOverload._op``: the cheapest local op call
a C-API-only path can make. "native-op" is the C path with every cached plan's ``local_call``
cleared (``OpOverload._op``, as before that shortcut existed).

    .venv/bin/python benchmarks/native_overhead.py [--rounds 41] [--batch 1000] [--ops add mul]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import dtdispatch
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch import cache

_new = torch.Tensor._dtensor__new__
_VF = torch._C._VariableFunctions

OPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": lambda a, b: a + a,
    "mul": lambda a, b: a * a,
    "relu": lambda a, b: torch.relu(a),
    "mm": lambda a, b: torch.mm(a, b),
}


class _Floor(DTensor):
    """A minimal __torch_dispatch__: call the op on the locals (as ``OpOverload.__call__`` does) and
    wrap one output with the first argument's spec. No key, no cache, no checks: valid only for the
    ops measured here, whose output spec equals the first argument's."""

    __slots__ = ()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def,override]
        local = [a._local_tensor if isinstance(a, DTensor) else a for a in args]
        out = func._op(*local)
        return _new(cls, out, args[0]._spec, requires_grad=out.requires_grad)


class _FloorPublic(DTensor):
    """``_Floor`` calling the public function of the op's name instead of ``OpOverload._op`` (the
    ops measured here have one: add.Tensor, mul.Tensor, relu.default, mm.default)."""

    __slots__ = ()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def,override]
        local = [a._local_tensor if isinstance(a, DTensor) else a for a in args]
        out = getattr(_VF, func._schema.name[6:])(*local)
        return _new(cls, out, args[0]._spec, requires_grad=out.requires_grad)


_saved_local_calls: dict[Any, Any] = {}


def _set_local_calls(*, enabled: bool) -> None:
    """Clear every cached plan's ``local_call`` (remembering it), or put it back."""
    entries = cache.thread_cache().entries
    for key, plan in entries.items():
        if enabled and key in _saved_local_calls:
            entries[key] = dataclasses.replace(plan, local_call=_saved_local_calls[key])
        elif not enabled and plan.local_call is not None:
            _saved_local_calls[key] = plan.local_call
            entries[key] = dataclasses.replace(plan, local_call=None)


def _time(fn: Callable[[Any, Any], Any], args: tuple[Any, Any], batch: int) -> float:
    a, b = args
    start = time.perf_counter_ns()
    for _ in range(batch):
        fn(a, b)
    return (time.perf_counter_ns() - start) / batch / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--ops", nargs="*", default=list(OPS))
    opts = parser.parse_args()
    torch.set_num_threads(1)
    cases = [
        (f"{name}{'+grad' if grad else ''}", OPS[name], grad)
        for grad in (False, True)
        for name in opts.ops
    ]
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            stock_a = distribute_tensor(torch.randn(8, 8), mesh, [Shard(0)])
            stock_b = distribute_tensor(torch.randn(8, 8), mesh, [Replicate()])
            impls = sorted(native.implementations())  # "native" (when built) and "python"

            def inputs(grad: bool) -> dict[str, tuple[Any, Any]]:
                pair = []
                for stock in (stock_a, stock_b):
                    s = stock.detach().requires_grad_(grad)
                    local = s._local_tensor.detach().requires_grad_(grad)
                    pair.append(
                        {
                            "local": local,
                            "floor": _new(_Floor, s._local_tensor, s._spec, requires_grad=grad),
                            "floor-pub": _new(
                                _FloorPublic, s._local_tensor, s._spec, requires_grad=grad
                            ),
                            "stock": s,
                            "fast": dtdispatch.accelerate(s),
                        }
                    )
                return {label: (pair[0][label], pair[1][label]) for label in pair[0]}

            by_grad = {grad: inputs(grad) for grad in (False, True)}
            variants: list[tuple[str, str, str | None]] = [
                ("local", "local", None),
                ("floor", "floor", None),
                ("floor-pub", "floor-pub", None),
                ("stock", "stock", None),
            ]
            variants += [(f"fast[{impl}]", "fast", impl) for impl in impls]
            if "native" in impls:
                # the C path with every plan's local_call cleared: OpOverload._op, as before it
                variants.append(("native-op", "fast", "native-op"))
            samples: dict[tuple[str, str], list[float]] = {}

            def select(impl: str | None) -> None:
                if impl is not None:
                    dispatcher.install(impl.removesuffix("-op"))
                    _set_local_calls(enabled=impl != "native-op")

            for _, fn, grad in cases:
                for _label, kind, impl in variants:  # warm up: fill the plan caches
                    select(impl)
                    _time(fn, by_grad[grad][kind], 200)
            for _ in range(opts.rounds):
                for name, fn, grad in cases:
                    for label, kind, impl in variants:
                        select(impl)
                        samples.setdefault((name, label), []).append(
                            _time(fn, by_grad[grad][kind], opts.batch)
                        )
            dispatcher.install(native.DEFAULT)
        finally:
            dist.destroy_process_group()
    labels = [label for label, _, _ in variants]
    print(
        f"median µs per call, {opts.rounds} interleaved rounds x {opts.batch} calls, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread"
    )
    print(
        f"{'op':10}"
        + "".join(f"{label:>13}" for label in labels)
        + "".join(f"{label + '/stock':>18}" for label in labels[1:] if label != "stock")
    )
    ratios: dict[str, list[float]] = {}
    for name, _, _ in cases:
        med = {label: statistics.median(samples[(name, label)]) for label in labels}
        row = f"{name:10}" + "".join(f"{med[label]:13.2f}" for label in labels)
        for label in labels[1:]:
            if label != "stock":
                ratio = med[label] / med["stock"]
                ratios.setdefault(f"{label} {'grad' if '+grad' in name else 'no grad'}", []).append(
                    ratio
                )
                row += f"{ratio:18.3f}"
        print(row)
    for what, values in ratios.items():
        print(f"geomean {what:24} {math.exp(sum(map(math.log, values)) / len(values)):.3f}")


if __name__ == "__main__":
    main()
