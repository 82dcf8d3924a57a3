"""The path above dispatch (FastDTensor.__torch_function__; ARCHITECTURE "The path above
dispatch") against stock DTensor.

Not a test. World size 1 (gloo, file store), 8x8 float32, one thread, interleaved batches so that
machine noise hits every variant alike; medians over rounds. Variants: stock DTensor, "above"
(dtdispatch with the path above dispatch, C when built) and "below" (dtdispatch with it off:
``__torch_dispatch__`` only). Ratios are to stock.

"floor" is a DTensor subclass whose ``__torch_function__`` is the cheapest possible Python handler
that steps aside (it calls torch's disabled implementation): what having any handler costs where a
call is not replayed (attribute reads, views, autograd), i.e. torch's own price for calling one.

Groups: cached single ops under ``no_grad`` (geomean target <= 0.45); sharded view / reshape on
Shard(0) (<= 0.25) and add Shard(0)+Replicate (<= 0.30) under ``no_grad``; attribute reads (<= 1.5x
stock); the same ops with autograd (inputs require grad, grad mode on), where the handler only steps
aside: its cost there is "above" minus "below".

    .venv/bin/python benchmarks/above_dispatch.py [--rounds 31] [--batch 500] [--impl native]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import dtdispatch
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native

Args = dict[str, Any]

NO_GRAD_OPS: dict[str, Callable[[Args], Any]] = {
    "add": lambda t: t["s"] + t["s"],
    "mul": lambda t: t["s"] * t["s"],
    "relu": lambda t: torch.relu(t["s"]),
    "sum": lambda t: t["s"].sum(),
    "softmax": lambda t: F.softmax(t["s"], -1),
    "mm S0xR": lambda t: torch.mm(t["s"], t["r"]),
    "transpose": lambda t: t["s"].t(),
}
SHARDED: dict[str, Callable[[Args], Any]] = {
    "view(64) S0": lambda t: t["s"].view(64),
    "reshape S0": lambda t: t["s"].reshape(4, 16),
    "add S0+R": lambda t: t["s"] + t["r"],
}
ATTRIBUTES: dict[str, Callable[[Args], Any]] = {
    "shape": lambda t: t["s"].shape,
    "dtype": lambda t: t["s"].dtype,
    "device": lambda t: t["s"].device,
    "requires_grad": lambda t: t["s"].requires_grad,
    "placements": lambda t: t["s"].placements,
}
READS = (
    ("shape", lambda x: x.shape),
    ("dtype", lambda x: x.dtype),
    ("device", lambda x: x.device),
    ("requires_grad", lambda x: x.requires_grad),
    ("grad", lambda x: x.grad),
    ("is_leaf", lambda x: x.is_leaf),
    ("ndim", lambda x: x.ndim),
    ("size()", lambda x: x.size()),
    ("dim()", lambda x: x.dim()),
    ("numel()", lambda x: x.numel()),
)


def _all_reads(x: Any) -> None:
    for _, read in READS:
        read(x)


ROLES: dict[str, Callable[[Args], Any]] = {
    # The tensors of a training step (ARCHITECTURE "Two roles: replay and autograd"): each entry
    # times all ten reads of the list on one tensor.
    "parameter": lambda t: _all_reads(t["param"]),
    "gradient": lambda t: _all_reads(t["param"].grad),
    "activation": lambda t: _all_reads(t["act"]),
    "optimizer state": lambda t: _all_reads(t["exp_avg"]),
    "no_grad activation": lambda t: _all_reads(t["act_ng"]),
}
AUTOGRAD_OPS: dict[str, Callable[[Args], Any]] = {
    "add": lambda t: t["g"] + t["g"],
    "mul": lambda t: t["g"] * t["g"],
    "relu": lambda t: torch.relu(t["g"]),
    "mm": lambda t: torch.mm(t["g"], t["gr"]),
}
GROUPS: list[tuple[str, dict[str, Callable[[Args], Any]], bool]] = [
    ("cached single ops, no_grad", NO_GRAD_OPS, True),
    ("sharded view / redistribution, no_grad", SHARDED, True),
    ("attribute reads", ATTRIBUTES, False),
    ("ten attribute reads per tensor of a training step", ROLES, False),
    ("with autograd", AUTOGRAD_OPS, False),
]


class _Floor(DTensor):
    """Steps aside on every call, as cheaply as Python allows."""

    __slots__ = ()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def,override]
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs or {})


def _step_tensors(mesh: Any, value: torch.Tensor, *, accelerate: bool) -> Args:
    """A parameter (with its gradient), an activation and an AdamW state of one training step,
    and an activation made under no_grad."""
    param = torch.nn.Parameter(distribute_tensor(value, mesh, [Shard(0)]))
    x = distribute_tensor(torch.ones(8, 8), mesh, [Replicate()])
    if accelerate:
        holder = torch.nn.Module()
        holder.p = param
        dtdispatch.accelerate(holder)  # in place: the Parameter takes its role
        x = dtdispatch.accelerate(x)
    optimizer = torch.optim.AdamW([param], foreach=True)
    act = torch.mm(x, param.t())
    act.sum().backward()
    optimizer.step()
    with torch.no_grad():
        act_ng = torch.mm(x, param.t())
    state = optimizer.state[param]
    return {"param": param, "act": act, "exp_avg": state["exp_avg"], "act_ng": act_ng}


def _time(fn: Callable[[Args], Any], arg: Args, batch: int, no_grad: bool) -> float:
    ctx: AbstractContextManager[Any] = torch.no_grad() if no_grad else nullcontext()
    with ctx:
        start = time.perf_counter_ns()
        for _ in range(batch):
            fn(arg)
        return (time.perf_counter_ns() - start) / batch / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--impl", default=native.DEFAULT, choices=sorted(native.implementations()))
    opts = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))

            def make(value: torch.Tensor, placement: Any, grad: bool = False) -> Any:
                t = distribute_tensor(value, mesh, [placement])
                return t.requires_grad_() if grad else t

            gen = torch.Generator().manual_seed(0)
            values = [torch.randn(8, 8, generator=gen) for _ in range(4)]
            stock: Args = {
                "s": make(values[0], Shard(0)),
                "r": make(values[1], Replicate()),
                "g": make(values[2], Shard(0), grad=True),
                "gr": make(values[3], Replicate(), grad=True),
            }
            fast: Args = {
                k: dtdispatch.accelerate(v.detach().requires_grad_(v.requires_grad))
                for k, v in stock.items()
            }
            floor: Args = {
                k: torch.Tensor._dtensor__new__(
                    _Floor, v._local_tensor, v._spec, requires_grad=v.requires_grad
                )
                for k, v in stock.items()
            }
            for args, accelerate in ((stock, False), (fast, True)):
                args.update(_step_tensors(mesh, values[0], accelerate=accelerate))
            floor.update({k: v for k, v in stock.items() if k not in floor})  # stock's, no floor
            variants: list[tuple[str, Args, bool | None]] = [
                ("stock", stock, None),
                ("above", fast, True),
                ("below", fast, False),
                ("floor", floor, None),
            ]
            samples: dict[tuple[str, str], list[float]] = {}

            def run(batch: int, record: bool) -> None:
                for _group, ops, no_grad in GROUPS:
                    for name, fn in ops.items():
                        for label, arg, above in variants:
                            if above is not None:
                                dispatcher.install(opts.impl, above=above)
                            us = _time(fn, arg, batch, no_grad)
                            if record:
                                samples.setdefault((name + str(no_grad), label), []).append(us)

            run(100, record=False)  # warm up: plans, negative entries, pass-through funcs
            for _ in range(opts.rounds):
                run(opts.batch, record=True)
            dispatcher.install(native.DEFAULT)
            stats = dtdispatch.stats()["above"]
        finally:
            dist.destroy_process_group()
    labels = [label for label, _, _ in variants]
    print(
        f"median µs per call, {opts.rounds} interleaved rounds x {opts.batch} calls, "
        f"torch {torch.__version__}, impl {opts.impl}, {torch.get_num_threads()} thread"
    )
    for group, ops, no_grad in GROUPS:
        print(f"\n{group}")
        print(
            f"{'':16}"
            + "".join(f"{label:>10}" for label in labels)
            + "".join(f"{label + '/stock':>13}" for label in labels[1:])
        )
        ratios: dict[str, list[float]] = {label: [] for label in labels[1:]}
        for name in ops:
            med = {
                label: statistics.median(samples[(name + str(no_grad), label)]) for label in labels
            }
            for label in labels[1:]:
                ratios[label].append(med[label] / med["stock"])
            print(
                f"{name:16}"
                + "".join(f"{med[label]:10.2f}" for label in labels)
                + "".join(f"{med[label] / med['stock']:13.2f}" for label in labels[1:])
            )
        print(
            f"{'geomean':16}{'':{10 * len(labels)}}"
            + "".join(
                f"{math.exp(sum(math.log(r) for r in rs) / len(rs)):13.2f}"
                for rs in ratios.values()
            )
        )
    print(f"\nabove-dispatch negative entries by reason: {stats['negative']}")


if __name__ == "__main__":
    main()
