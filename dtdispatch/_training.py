"""Training on dtdispatch: parallel-style hooks that hand out dtdispatch activations; coverage.

torch's parallel styles (``ColwiseParallel``, ``RowwiseParallel``, ``SequenceParallel``,
``PrepareModuleInput``, ``PrepareModuleOutput`` ... all through ``distribute_module`` or
``register_forward_(pre_)hook``) create the activations of a parallelized module with
``DTensor.from_local``: plain DTensors, so every op that touches only activations would take torch's
path even when the parameters are dtdispatch tensors. ``wrap_hooks`` replaces the hooks of those
styles by dtdispatch twins that build FastDTensors with FastDTensor's cheap ``from_local`` /
``redistribute`` / ``to_local`` (in place: same dict entry, so ids, order, ``with_kwargs`` and
``always_call`` flags are kept), and wraps any other hook from ``torch.distributed.tensor`` so that
the DTensors it returns come back as FastDTensors, autograd-correct; ``unwrap_hooks`` restores them.

Gradients need no hook here: every backward op has a FastDTensor operand or produces one, and the
backward of FastDTensor's ``to_local``, ``full_tensor`` and ``redistribute`` hands on FastDTensors
(``dtdispatch/_tensor.py``). The backward of ``from_local`` returns a plain local tensor, as in
stock.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)
from torch.distributed.tensor.placement_types import Placement
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from dtdispatch._tensor import FAST_TYPES, FastDTensor, _fast_from, _ToFast, compiled_fast

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


# ---------------------------------------------------------------------------------------------
# torch's parallel styles, rewritten to hand out FastDTensors through FastDTensor's cheap calls.
#
# NOTE: each function below mirrors the torch function named in its docstring line for line, with
# ``DTensor.from_local`` replaced by ``FastDTensor.from_local`` and a plain DTensor input made a
# FastDTensor first (so ``redistribute`` / ``to_local`` are FastDTensor's). They are used only for
# hooks recognized exactly (the function a style's partial binds, or a style object of exactly
# torch's class); anything else keeps the generic ``_FastHook`` wrapper. The training parity tests
# compare every style against stock bitwise; re-check them against torch's when upgrading torch.


def _fast_input(t: Any) -> Any:
    return _fast_activation(t) if type(t) is DTensor else t


def _linear_input(
    input_layouts: Any,
    desired_input_layouts: Any,
    device_mesh: DeviceMesh,
    mod: nn.Module,
    inputs: Any,
) -> Any:
    """``ColwiseParallel._prepare_input_fn`` and ``RowwiseParallel._prepare_input_fn``."""
    input_tensor = inputs[0]
    if not isinstance(input_tensor, DTensor):
        input_tensor = FastDTensor.from_local(
            input_tensor, device_mesh, input_layouts, run_check=False
        )
    else:
        input_tensor = _fast_input(input_tensor)
    if input_layouts != desired_input_layouts:
        input_tensor = input_tensor.redistribute(placements=desired_input_layouts, async_op=True)
    return input_tensor


def _linear_output(
    output_layouts: Any,
    use_local_output: bool,
    device_mesh: DeviceMesh,
    mod: nn.Module,
    inputs: Any,
    outputs: Any,
) -> Any:
    """``ColwiseParallel._prepare_output_fn`` and ``RowwiseParallel._prepare_output_fn``."""
    outputs = _fast_input(outputs)
    if outputs.placements != output_layouts:
        outputs = outputs.redistribute(placements=output_layouts, async_op=True)
    return outputs.to_local() if use_local_output else outputs


def _sequence_input(
    sequence_sharding: Any, device_mesh: DeviceMesh, mod: nn.Module, inputs: Any
) -> Any:
    """``SequenceParallel._prepare_input_fn``."""
    input_tensor = inputs[0]
    if isinstance(input_tensor, DTensor):
        input_tensor = _fast_input(input_tensor)
        if input_tensor.placements != sequence_sharding:
            input_tensor = input_tensor.redistribute(placements=sequence_sharding, async_op=True)
        return input_tensor
    elif isinstance(input_tensor, torch.Tensor):
        return FastDTensor.from_local(input_tensor, device_mesh, sequence_sharding, run_check=False)
    else:
        raise ValueError(
            f"expecting input of {mod} to be a torch.Tensor or DTensor, but got {input_tensor}"
        )


def _sequence_output(
    use_local_output: bool, device_mesh: DeviceMesh, mod: nn.Module, inputs: Any, outputs: Any
) -> Any:
    """``SequenceParallel._prepare_output_fn``."""
    outputs = _fast_input(outputs)
    return outputs.to_local() if use_local_output else outputs


def _prepare_input_arg(
    style: PrepareModuleInput,
    input: Any,
    mesh: DeviceMesh,
    input_layout: Placement | None,
    desired_layout: Placement | None,
) -> Any:
    """``PrepareModuleInput._prepare_input_arg``."""
    if input_layout is None:
        return input
    if isinstance(input, DTensor):
        dt_inp = _fast_input(input)
    else:
        if not isinstance(input, torch.Tensor):
            raise AssertionError("expecting input to be a torch.Tensor!")
        dt_inp = FastDTensor.from_local(input, mesh, (input_layout,), run_check=False)
    if desired_layout is not None and input_layout != desired_layout:
        dt_inp = dt_inp.redistribute(placements=(desired_layout,))
    return dt_inp.to_local() if style.use_local_output else dt_inp


def _prepare_inputs(style: PrepareModuleInput, inputs: Any, device_mesh: DeviceMesh) -> Any:
    """``PrepareModuleInput._prepare_input_fn``."""
    if style.input_layouts is None:
        return inputs
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    if len(inputs) != len(style.input_layouts):
        raise ValueError("module inputs and input_layouts should have same length!")
    if style.desired_input_layouts is None:
        raise AssertionError("desired module inputs should not be None!")
    return tuple(
        _prepare_input_arg(style, inp, device_mesh, input_layout, desired_layout)
        for inp, input_layout, desired_layout in zip(
            inputs,
            style.input_layouts,
            style.desired_input_layouts,
            strict=False,  # as torch
        )
    )


def _module_input(
    style: PrepareModuleInput, device_mesh: DeviceMesh, mod: nn.Module, inputs: Any
) -> Any:
    """The forward pre-hook ``PrepareModuleInput._apply`` registers (without kwargs)."""
    return _prepare_inputs(style, inputs, device_mesh)


def _module_input_kwargs(
    style: PrepareModuleInput,
    device_mesh: DeviceMesh,
    mod: nn.Module,
    inputs: Any,
    kwarg_inputs: dict[str, Any],
) -> Any:
    """``PrepareModuleInput._prepare_input_kwarg_fn`` (the hook registered with kwargs)."""
    prepared_arg_inputs = _prepare_inputs(style, inputs, device_mesh)
    prepared_kwarg_inputs = {}
    for kwarg_key in kwarg_inputs:
        prepared_kwarg_inputs[kwarg_key] = _prepare_input_arg(
            style,
            kwarg_inputs[kwarg_key],
            device_mesh,
            style.input_kwarg_layouts.get(kwarg_key),
            style.desired_input_kwarg_layouts.get(kwarg_key),
        )
    return (prepared_arg_inputs, prepared_kwarg_inputs)


def _module_output(
    style: PrepareModuleOutput, device_mesh: DeviceMesh, mod: nn.Module, inputs: Any, outputs: Any
) -> Any:
    """``PrepareModuleOutput._prepare_out_fn``."""
    prepared_outputs = []
    if not isinstance(outputs, tuple):
        outputs = (outputs,)
    if len(outputs) != len(style.output_layouts):
        raise ValueError("module outputs and output_layouts should have same length!")
    for out, out_layout, desired_out_layout in zip(
        outputs,
        style.output_layouts,
        style.desired_output_layouts,
        strict=False,  # as torch
    ):
        if out_layout is not None:
            if isinstance(out, DTensor):
                dt_out = _fast_input(out)
            else:
                dt_out = FastDTensor.from_local(out, device_mesh, (out_layout,), run_check=False)
            if out_layout != desired_out_layout:
                dt_out = dt_out.redistribute(placements=(desired_out_layout,))
            prepared_outputs.append(dt_out.to_local() if style.use_local_output else dt_out)
        else:
            prepared_outputs.append(out)
    if len(prepared_outputs) == 1:
        return prepared_outputs[0]
    return tuple(prepared_outputs)


_STYLE_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    ColwiseParallel._prepare_input_fn: _linear_input,
    RowwiseParallel._prepare_input_fn: _linear_input,
    ColwiseParallel._prepare_output_fn: _linear_output,
    RowwiseParallel._prepare_output_fn: _linear_output,
    SequenceParallel._prepare_input_fn: _sequence_input,
    SequenceParallel._prepare_output_fn: _sequence_output,
}
"""torch's style functions (bound by ``functools.partial`` and handed to ``distribute_module``)
-> their dtdispatch twins."""


class _StyleHook(functools.partial):  # type: ignore[type-arg]
    """A dtdispatch twin of one torch parallel-style hook, called directly as a partial (no extra
    Python frame); ``original`` is torch's hook, for ``unwrap_hooks``."""

    original: Callable[..., Any]


def _closure(hook: Any) -> dict[str, Any]:
    code = getattr(hook, "__code__", None)
    cells = getattr(hook, "__closure__", None) or ()
    if code is None:
        return {}
    return dict(zip(code.co_freevars, (c.cell_contents for c in cells), strict=True))


def _style_twin(hook: Any) -> _StyleHook | None:
    """The dtdispatch twin of a torch parallel-style hook, or None when ``hook`` is not one of the
    hooks ``distribute_module`` (with a style function) or ``PrepareModuleInput`` /
    ``PrepareModuleOutput`` register, exactly."""
    qualname = getattr(hook, "__qualname__", "")
    cells = _closure(hook)
    mesh = cells.get("device_mesh")
    if not isinstance(mesh, DeviceMesh):
        return None
    nargs = hook.__code__.co_argcount
    twin: _StyleHook | None = None
    if qualname == "distribute_module.<locals>.<lambda>":
        fn = cells.get("input_fn" if nargs == 2 else "output_fn")
        if (
            isinstance(fn, functools.partial)
            and type(fn) is functools.partial
            and not fn.keywords
            and fn.func in _STYLE_FUNCTIONS
            # the three-argument form (mod, inputs|outputs, device_mesh): what styles use
            and "mod" in hook.__code__.co_varnames[:nargs]
        ):
            twin = _StyleHook(_STYLE_FUNCTIONS[fn.func], *fn.args, mesh)
    elif qualname == "PrepareModuleInput._apply.<locals>.<lambda>":
        style = cells.get("self")
        if type(style) is PrepareModuleInput:
            impl = _module_input if nargs == 2 else _module_input_kwargs
            twin = _StyleHook(impl, style, mesh)
    elif qualname == "PrepareModuleOutput._apply.<locals>.<lambda>":
        style = cells.get("self")
        if type(style) is PrepareModuleOutput and nargs == 3:
            twin = _StyleHook(_module_output, style, mesh)
    if twin is not None:
        twin.original = hook
    return twin


def _hook_dicts(module: nn.Module) -> tuple[dict[int, Any], ...]:
    return (module._forward_pre_hooks, module._forward_hooks)


def wrap_hooks(module: nn.Module) -> int:
    """Make torch's parallel-style forward (pre-)hooks of ``module`` and its submodules hand out
    FastDTensors; idempotent.

    The hooks of torch's styles (``ColwiseParallel``, ``RowwiseParallel``, ``SequenceParallel``
    through ``distribute_module``, ``PrepareModuleInput``, ``PrepareModuleOutput``) are replaced
    by dtdispatch twins that build FastDTensors with FastDTensor's cheap calls; other hooks defined
    under ``torch.distributed.tensor`` are wrapped so that their DTensor outputs come back as
    FastDTensors. Either way the dict entry stays (ids, order, ``with_kwargs`` and
    ``always_call`` flags are kept). Returns how many hooks this call replaced or wrapped. Hooks
    defined outside ``torch.distributed.tensor`` (the user's own) are left alone: their DTensor
    outputs still reach dtdispatch when they meet a FastDTensor.
    """
    wrapped = 0
    for sub in module.modules():
        for hooks in _hook_dicts(sub):
            for hook_id, hook in list(hooks.items()):
                if isinstance(hook, (_FastHook, _StyleHook)):
                    continue
                if _defining_module(hook).startswith(_TORCH_DTENSOR):
                    hooks[hook_id] = _style_twin(hook) or _FastHook(hook)
                    wrapped += 1
    return wrapped


def unwrap_hooks(module: nn.Module) -> int:
    """Undo ``wrap_hooks`` on ``module`` and its submodules; returns how many were restored."""
    restored = 0
    for sub in module.modules():
        for hooks in _hook_dicts(sub):
            for hook_id, hook in list(hooks.items()):
                if isinstance(hook, (_FastHook, _StyleHook)):
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
        if DTensor in types and not any(t in FAST_TYPES for t in types):
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
