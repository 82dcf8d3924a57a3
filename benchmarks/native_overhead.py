"""Per-op dispatch cost: stock DTensor vs FastDTensor (Python twin) vs FastDTensor (C extension).

Not a test. World size 1 (gloo, file store), 8x8 float32 Shard(0), one thread, interleaved batches
so that machine noise hits every variant alike. Prints the median µs per op call of each variant and
the overhead over the plain local op. "floor" is a minimal Python ``__torch_dispatch__`` (unwrap,
call the op, wrap; no key, no cache, no counting): what entering Python, calling an ``OpOverload``
and building a DTensor cost by themselves.

    .venv/bin/python benchmarks/native_overhead.py [--rounds 41] [--batch 1000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import dtdispatch
from dtdispatch import dispatcher, native

_new = torch.Tensor._dtensor__new__

OPS: dict[str, Callable[[Any], Any]] = {
    "add": lambda t: t + t,
    "mul": lambda t: t * t,
    "relu": torch.relu,
}


class _Floor(DTensor):
    """A minimal __torch_dispatch__: call the op on the locals (as ``OpOverload.__call__`` does) and
    wrap one output with the first argument's spec. No key, no cache, no checks: valid only for the
    same-spec elementwise ops measured here."""

    __slots__ = ()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def,override]
        local = [a._local_tensor if isinstance(a, DTensor) else a for a in args]
        out = func._op(*local)
        return _new(cls, out, args[0]._spec, requires_grad=out.requires_grad)


def _time(fn: Callable[[Any], Any], arg: Any, batch: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(batch):
        fn(arg)
    return (time.perf_counter_ns() - start) / batch / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--batch", type=int, default=1000)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            stock = distribute_tensor(torch.randn(8, 8), mesh, [Shard(0)])
            fast = dtdispatch.accelerate(stock)
            local = stock.to_local()
            impls = sorted(native.implementations())  # "native" (when built) and "python"
            floor = _new(_Floor, local, stock._spec, requires_grad=False)
            variants: list[tuple[str, Any, str | None]] = [
                ("local", local, None),
                ("floor", floor, None),
                ("stock", stock, None),
            ]
            variants += [(f"fast[{impl}]", fast, impl) for impl in impls]
            samples: dict[tuple[str, str], list[float]] = {}
            for fn in OPS.values():
                for _label, arg, impl in variants:  # warm up: fill the plan caches
                    if impl is not None:
                        dispatcher.install(impl)
                    _time(fn, arg, 200)
            for _ in range(opts.rounds):
                for name, fn in OPS.items():
                    for label, arg, impl in variants:
                        if impl is not None:
                            dispatcher.install(impl)
                        samples.setdefault((name, label), []).append(_time(fn, arg, opts.batch))
            dispatcher.install(native.DEFAULT)
        finally:
            dist.destroy_process_group()
    labels = [label for label, _, _ in variants]
    print(
        f"median µs per call, {opts.rounds} interleaved rounds x {opts.batch} calls, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread"
    )
    print(
        f"{'op':6}"
        + "".join(f"{label:>15}" for label in labels)
        + "".join(f"{label + ' - local':>22}" for label in labels[1:])
    )
    for name in OPS:
        med = {label: statistics.median(samples[(name, label)]) for label in labels}
        row = f"{name:6}" + "".join(f"{med[label]:15.2f}" for label in labels)
        row += "".join(f"{med[label] - med['local']:22.2f}" for label in labels[1:])
        print(row)


if __name__ == "__main__":
    main()
