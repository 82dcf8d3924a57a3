"""Training on dtdispatch: parallel-style hooks that hand out dtdispatch activations; coverage.

torch's parallel styles (``ColwiseParallel``, ``RowwiseParallel``, ``SequenceParallel``,
``PrepareModuleInput``, ``PrepareModuleOutput`` ... all through ``distribute_module`` or
``register_forward_(pre_)hook``) create the activations of a parallelized module with
``DTensor.from_local``: plain DTensors, so every op that touches only activations would take torch's
path even when the parameters are dtdispatch tensors. ``wrap_hooks`` wraps those hooks (in place:
same dict entry, so ids, order, ``with_kwargs`` and ``always_call`` flags are kept) so that the
DTensors they return come back as FastDTensors, autograd-correct; ``unwrap_hooks`` restores them.

Gradients need no hook here: every backward op has a FastDTensor operand or produces one, and the
three torch autograd Functions that build a plain DTensor gradient (the backward of ``to_local``,
``full_tensor`` and ``redistribute``) are handled at their source, ``FastDTensor``'s methods in
``dtdispatch/_tensor.py``. The backward of ``from_local`` returns a plain local tensor, as in stock.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from dtdispatch._tensor import FastDTensor, _fast_from, _ToFast, compiled_fast

__all__ = ["coverage", "unwrap_hooks", "wrap_hooks"]

_TORCH_DTENSOR = "torch.distributed.tensor"
"""Hooks defined under this package are torch's parallel-style hooks (``_api.distribute_module``'s
lambdas, ``parallel.style``'s PrepareModule* lambdas, context parallel): the ones that create plain
DTensors."""


def _defining_module(hook: Any) -> str:
    fn = hook
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__module__", None) or ""


def _fast_activation(t: DTensor) -> FastDTensor:
    """The FastDTensor view of one hook output (zero-copy). When it needs grad, leaf or not, through
    ``_ToFast`` (gradients pass unchanged), so the graph stays connected to what the hook made."""
    if torch.compiler.is_compiling():
        return compiled_fast(t)
    if t.requires_grad:
        return _ToFast.apply(t)  # type: ignore[no-any-return,no-untyped-call]
    return _fast_from(t)


def _to_fast_tree(result: Any) -> Any:
    leaves, spec = pytree.tree_flatten(result)
    if not any(type(leaf) is DTensor for leaf in leaves):
        return result  # nothing to convert: the hook's own object, untouched
    return pytree.tree_unflatten(
        [_fast_activation(x) if type(x) is DTensor else x for x in leaves], spec
    )


class _FastHook:
    """A torch parallel-style hook whose plain DTensor outputs come back as FastDTensors."""

    __slots__ = ("__weakref__", "original")

    def __init__(self, original: Callable[..., Any]) -> None:
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _to_fast_tree(self.original(*args, **kwargs))

    def __repr__(self) -> str:
        return f"dtdispatch hook({self.original!r})"


def _hook_dicts(module: nn.Module) -> tuple[dict[int, Any], ...]:
    return (module._forward_pre_hooks, module._forward_hooks)


def wrap_hooks(module: nn.Module) -> int:
    """Wrap torch's parallel-style forward (pre-)hooks of ``module`` and its submodules; idempotent.

    Returns how many hooks were wrapped by this call. Hooks defined outside
    ``torch.distributed.tensor`` (the user's own) are left alone: their DTensor outputs still reach
    dtdispatch when they meet a FastDTensor.
    """
    wrapped = 0
    for sub in module.modules():
        for hooks in _hook_dicts(sub):
            for hook_id, hook in list(hooks.items()):
                torch_style = _defining_module(hook).startswith(_TORCH_DTENSOR)
                if torch_style and not isinstance(hook, _FastHook):
                    hooks[hook_id] = _FastHook(hook)
                    wrapped += 1
    return wrapped


def unwrap_hooks(module: nn.Module) -> int:
    """Undo ``wrap_hooks`` on ``module`` and its submodules; returns how many were restored."""
    restored = 0
    for sub in module.modules():
        for hooks in _hook_dicts(sub):
            for hook_id, hook in list(hooks.items()):
                if isinstance(hook, _FastHook):
                    hooks[hook_id] = hook.original
                    restored += 1
    return restored


def _dtdispatch_count() -> int:
    """Calls that entered FastDTensor's ``__torch_dispatch__``, all threads (finished ones too)."""
    from dtdispatch import stats

    s = stats()
    bailouts = s["bailouts"]
    # A hit or a miss is counted in hits/misses; calls that never reach the cache are counted only
    # as these bailouts (no key: e.g. symbolic shapes or torch's mixed-tensor error; custom handler:
    # torch's own handlers run before any sharding logic, exactly as in stock).
    return int(
        s["hits"] + s["misses"] + bailouts.get("no key", 0) + bailouts.get("custom handler", 0)
    )


_torch_counters = getattr(torch._C, "_get_DTensor_sharding_propagator_cache_stats", None)
"""torch's per-thread fast-path counters (torch 2.10+); without them ``coverage`` counts stock
dispatches with a dispatch mode instead."""


def _stock_count() -> int:
    hits, misses = _torch_counters()  # type: ignore[misc]
    return int(hits + misses)


class _StockOps(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Names the ops that reached plain DTensors (only with ``coverage(..., by_op=True)``)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if DTensor in types and FastDTensor not in types:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def coverage(step: Callable[[], Any], *, by_op: bool = False) -> dict[str, Any]:
    """Run ``step()`` once and say how many of its DTensor op dispatches went through dtdispatch.

    Returns ``{"dtdispatch": n, "stock": m, "fraction": n / (n + m), "result": step's return
    value}`` and, with ``by_op=True``, ``"stock_ops"``: a ``Counter`` of the ops that took torch's
    path (measured under a ``TorchDispatchMode``, which slows the step down; leave it off for
    timing).

    What is counted: ``n`` is the change over the step of dtdispatch's hits + misses + calls handed
    to Python before any cache lookup (bailouts "no key" and "custom handler"), i.e. every aten call
    that entered dtdispatch. ``m`` is the change of torch's own per-thread fast-path counters (hits
    + misses of ``torch._C._get_DTensor_sharding_propagator_cache_stats()``), i.e. every aten call
    on plain DTensors that reached torch's sharding cache. Limits: torch does not count its
    custom-handler ops, nor calls whose arguments it cannot key (symbolic shapes), so ``m`` can be
    slightly low; torch's counters are those of the calling thread while dtdispatch's aggregate all
    threads, so where backward runs on other threads (autograd's CUDA device threads) stock's
    backward dispatches are missed and the fraction reads high (measure on CPU); redistributions
    and ``from_local``/``to_local`` are not op dispatches and count on neither side. ``fraction``
    is NaN when the step dispatched no DTensor op. On a torch without those counters, ``m`` is
    counted with the dispatch mode of ``by_op``.
    """
    counted = _torch_counters is not None
    mode = _StockOps() if by_op or not counted else None
    before_fast, before_stock = _dtdispatch_count(), _stock_count() if counted else 0
    if mode is not None:
        with mode:
            result = step()
    else:
        result = step()
    n = _dtdispatch_count() - before_fast
    m = _stock_count() - before_stock if counted else sum(mode.ops.values())  # type: ignore[union-attr]
    report: dict[str, Any] = {
        "dtdispatch": n,
        "stock": m,
        "fraction": n / (n + m) if n + m else math.nan,
        "result": result,
    }
    if by_op and mode is not None:
        report["stock_ops"] = mode.ops
    return report
