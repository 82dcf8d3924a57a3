"""Shared harness of the real-client runs (``make clients``): a case is a program that trains (or
generates) and reports, per step, the tensors that decide its result; it runs once on stock DTensor,
then once per dtdispatch configuration, then on stock again, in one process with the same seeds.
Every record is compared bitwise with the first stock run (local bytes, dtype, shape, stride,
placements); the second stock run shows that the program is deterministic and that dtdispatch left
stock DTensor as it found it.

Rank 0 prints one table row per (client, case, configuration); a row fails if it failed on any rank.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import dtdispatch
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native

# Per step: record name -> fingerprint (metadata and a digest of the bytes).
Trace = list[dict[str, str]]
# A case: given whether it runs on dtdispatch, yields one record dict per step.
CaseFn = Callable[[bool], Iterator[dict[str, Any]]]

STOCK = "stock"
STOCK_AGAIN = "stock again"


def fingerprint(value: Any) -> str:
    """What must be equal to stock: for a tensor its type's kind (DTensor or not), dtype, shape,
    stride, placements and a digest of its local bytes; anything else by ``repr``."""
    if isinstance(value, DTensor):
        local = value.to_local()
        head = f"DTensor{tuple(value.shape)} {value.placements} "
        return head + fingerprint(local)
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        data = t.contiguous().cpu()
        if data.is_complex():
            data = torch.view_as_real(data)
        raw = data.reshape(-1).view(torch.uint8) if data.numel() else data.reshape(-1)
        digest = hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]
        return f"{t.dtype} {tuple(t.shape)} {t.stride()} {digest}"
    return repr(value)


def param_records(model: torch.nn.Module, fast: bool, grads: bool = True) -> dict[str, Any]:
    """Every parameter (and its gradient when ``grads``) of ``model`` by name, after
    ``check_fast``."""
    check_fast(model, fast)
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        out[f"param {name}"] = p
        if grads and p.grad is not None:
            out[f"grad {name}"] = p.grad
    return out


def check_fast(model: torch.nn.Module, fast: bool) -> None:
    """On a dtdispatch run, every DTensor parameter and gradient must be a FastDTensor: otherwise
    the run would compare stock with stock. Raises AssertionError naming the first that is not."""
    if not fast:
        return
    for name, p in model.named_parameters():
        for what, t in (("parameter", p), ("gradient", p.grad)):
            if isinstance(t, DTensor) and not isinstance(t, dtdispatch.FastDTensor):
                raise AssertionError(f"{what} {name} is a {type(t).__name__}, not a FastDTensor")


@dataclass
class Outcome:
    """One run of a case: the trace as far as it got and, when it raised, what and where."""

    trace: Trace = field(default_factory=list)
    error: str | None = None


def _run(case: CaseFn, fast: bool) -> Outcome:
    out = Outcome()
    try:
        for record in case(fast):
            out.trace.append({k: fingerprint(v) for k, v in record.items()})
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        out.error = f"{type(e).__name__}: {msg[:160]}"
        if os.environ.get("CLIENTS_TRACEBACK"):
            traceback.print_exc()
    return out


def compare(stock: Outcome, other: Outcome) -> str | None:
    """None when ``other`` equals ``stock`` bitwise at every step (raising the same way too),
    else a short description of the first difference."""
    for i, (a, b) in enumerate(zip(stock.trace, other.trace, strict=False)):
        if a != b:
            keys = [k for k in a if a.get(k) != b.get(k)] + [k for k in b if k not in a]
            more = f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""
            text = f"differs at step {i}: {keys[0]}{more}"
            # The scalars a reader compares first, when they start to differ later.
            for key in ("loss", "grad norm"):
                later = [j for j, (x, y) in enumerate(zip(stock.trace, other.trace, strict=False))
                         if key in x and x.get(key) != y.get(key)]
                if later and key != keys[0]:
                    text += f"; {key} from step {later[0]}"
            if other.error is not None:
                text += f"; then raises at step {len(other.trace)}: {other.error}"
            return text
    if stock.error != other.error:
        if other.error is not None:
            return f"raises at step {len(other.trace)}: {other.error}"
        return f"stock raises at step {len(stock.trace)} ({stock.error}), this does not"
    if len(stock.trace) != len(other.trace):
        return f"{len(other.trace)} steps, stock {len(stock.trace)}"
    return None


@dataclass(frozen=True)
class Config:
    """A dtdispatch configuration: implementation and the path above dispatch on or off."""

    impl: str
    above: bool

    @property
    def name(self) -> str:
        return f"{self.impl}{'' if self.above else ' above=off'}"


def configs(spec: str) -> list[Config]:
    """``native,python`` x ``above`` from a spec like ``native:on,off;python:on``."""
    out = []
    for part in spec.split(";"):
        impl, _, aboves = part.partition(":")
        for a in (aboves or "on").split(","):
            out.append(Config(impl.strip(), a.strip() == "on"))
    return out


class Harness:
    """Runs cases on every configuration and collects the rows."""

    def __init__(self, client: str, argv: list[str] | None = None) -> None:
        parser = argparse.ArgumentParser(description=f"{client}: bitwise against stock DTensor")
        parser.add_argument(
            "--configs", default=os.environ.get("CLIENTS_CONFIGS", "native:on,off;python:on,off"),
            help="dtdispatch configurations, e.g. 'native:on,off;python:on' (impl:above)",
        )
        parser.add_argument("-k", dest="select", default="",
                            help="run only the cases whose name contains this")
        parser.add_argument("--steps", type=int, default=3)
        self.args = parser.parse_args(argv)
        self.client = client
        self.configs = configs(self.args.configs)
        available = native.implementations()
        for c in self.configs:
            if c.impl not in available:
                raise SystemExit(
                    f"dtdispatch implementation {c.impl!r} is not available: {native.REASON}"
                )
        self.rows: list[tuple[str, str, str, int]] = []
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def selected(self, case: str) -> bool:
        return self.args.select in case

    def case(self, name: str, fn: CaseFn) -> None:
        """Run ``fn`` on stock, each configuration, stock again; record one row per run."""
        if not self.selected(name):
            return
        stock = _run(fn, False)
        runs: list[tuple[str, Outcome]] = []
        for c in self.configs:
            dispatcher.install(c.impl, above=c.above)
            # NOTE: each run starts with no plans, as a fresh program would: a plan made by an
            # earlier case or configuration could otherwise decide this run's result.
            dtdispatch.clear_cache()
            runs.append((c.name, _run(fn, True)))
        # dtdispatch's own default again (DTDISPATCH_NATIVE, DTDISPATCH_ABOVE) for the stock rerun.
        dispatcher.install(native.DEFAULT)
        runs.append((STOCK_AGAIN, _run(fn, False)))
        steps = len(stock.trace)
        stock_result = "ok" if stock.error is None else f"raises at step {steps}: {stock.error}"
        self.rows.append((name, STOCK, stock_result, steps))
        for cname, outcome in runs:
            diff = compare(stock, outcome)
            self.rows.append((name, cname, diff or "bitwise equal", len(outcome.trace)))
        if self.rank == 0:
            print(f"[{self.client}] {name}: done", file=sys.stderr, flush=True)

    def finish(self) -> int:
        """Gather the rows of every rank, print the table on rank 0; 1 if anything differs or
        no case ran."""
        gathered: list[list[tuple[str, str, str, int]]] = [[] for _ in range(self.world)]
        dist.all_gather_object(gathered, self.rows)
        failed = 0
        if self.rank == 0:
            native_on, why = dtdispatch.native_status()
            print(f"\n{self.client}: {self.world} ranks, gloo, CPU, torch {torch.__version__}, "
                  f"native={native_on} ({why})")
            header = ("client", "case", "run", "records", "result")
            table: list[tuple[str, ...]] = []
            for i, row in enumerate(gathered[0]):
                name, run, result, steps = row
                per_rank = [g[i][2] for g in gathered]
                bad = [f"rank {r}: {res}" for r, res in enumerate(per_rank) if res != result]
                if bad:
                    result = f"rank 0: {result}; " + "; ".join(bad)
                if run == STOCK:
                    ok = all(res == "ok" for res in per_rank)
                else:
                    ok = all(res == "bitwise equal" for res in per_rank)
                failed += not ok
                table.append((self.client, name, run, str(steps), result))
            widths = [max(len(h), *(len(r[j]) for r in table)) if table else len(h)
                      for j, h in enumerate(header)]
            widths[-1] = len(header[-1])
            for r in (header, tuple("-" * w for w in widths), *table):
                print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
            ok_runs = len(table) - failed
            print(f"{self.client}: {ok_runs} of {len(table)} runs as expected, {failed} not")
            if not table:
                print(f"{self.client}: no case selected (-k {self.args.select!r})")
                failed = 1
        flag = torch.tensor([failed])
        dist.broadcast(flag, 0)
        dist.destroy_process_group()
        return int(flag.item() != 0)
