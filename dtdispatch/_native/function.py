"""The Python twin of ``_function.c``: the specification of the path above dispatch (ARCHITECTURE
"The path above dispatch").

``torch_function`` is FastDTensor's ``__torch_function__``. It decides, per call:
- pass-through: ``func`` is known to dispatch no aten op (attribute reads, ``dim()``, setters):
  torch's disabled implementation, exactly what stock DTensor does;
- step aside (stock behaviour, then the ``__torch_dispatch__`` path runs below): torch.compile
  tracing, a torch function or dispatch mode active, a view function (``x.t()``: its output is
  the argument's view, which a replay cannot make), autograd needed (grad mode on and a
  FastDTensor argument requires grad), or no key (an unhashable value, a tensor that is not a
  FastDTensor);
- the key holds every ambient state and tensor flag that decides the result or what raises
  (ARCHITECTURE 'What the key above dispatch holds'): grad and inference mode, the default dtype,
  autocast per device type, each FastDTensor's spec, ``requires_grad``, inference-ness and
  conj/neg bits;
- hit on a replay plan: call ``func`` on the local tensors, wrap outputs with the recorded specs
  (a view of a temporary: its base wrapped, the recorded view ops applied through dispatch);
- hit on a negative entry (a reason string): stock behaviour, counted by reason;
- miss: ``_above.miss`` (Python only) runs the call through the dispatch path, observes it and
  writes the plan or a negative entry.
The C code mirrors each block below, with a comment naming the block.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ambient", "build_key", "configure", "torch_function"]

_config: dict[str, Any] = {}

# Output entry kinds of a replay plan (``_above.TorchFunctionPlan.out``).
OUT_NEW = 0
"""(OUT_NEW, spec): a fresh FastDTensor wrapping the replay's output with ``spec``."""
OUT_ARG = 1
"""(OUT_ARG, flat index): the FastDTensor argument itself (in-place, ``out=``, ``.to(same)``)."""
OUT_NONE = 2
"""(OUT_NONE, None): None."""
OUT_SEQ = 3
"""(OUT_SEQ, (container type, entries)): a tuple/list/structseq of the entries above."""
OUT_VIEW = 4
"""(OUT_VIEW, (base spec, ((aten view op, its arguments after the first), ...))): the replay's
output is a view of a temporary the call made; its ``_base`` is wrapped as a FastDTensor with the
base spec and the view ops are applied to it in order through the dispatch path, so the output is
a real view with the autograd view metadata stock's has (ARCHITECTURE "The path above dispatch")."""


def configure(config: dict[str, Any]) -> None:
    """Hand over what the hot path needs, resolved once (see ``_dispatcher.install``):
    ``fast_type`` and ``autograd_type`` (a FastDTensor's two roles), ``tensor_type``, ``new``,
    ``disabled`` (``torch._C._disabled_torch_function_impl``), ``passthrough`` (dict: func ->
    True), ``view_functions`` (frozenset), ``thread_cache`` (``_above.thread_cache``), ``miss``
    (``_above.miss``), ``is_compiling``, ``tf_mode``, ``dispatch_modes``, ``grad_enabled``,
    ``inference``, ``default_dtype``, ``any_autocast``, ``autocast_state``, ``disable_subclass``,
    ``increment_version``, ``explicit_local``, ``op_dispatcher`` (torch's
    ``DTensor._op_dispatcher``, its custom op handlers read live), ``below_autograd`` (a guard
    class), ``kw_marker``, ``value_marker``, ``structure_marker``."""
    _config.update(config)


def ambient() -> tuple[Any, Any]:
    """(default dtype, autocast state): the ambient state a key holds besides grad and inference
    mode. The autocast state is None while no device type has autocast on (one cheap query), else
    ``_above.autocast_state()``."""
    c = _config
    return c["default_dtype"](), c["autocast_state"]() if c["any_autocast"]() else None


def build_key(
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad: bool,
    inference: bool,
    default_dtype: Any,
    autocast: Any,
) -> tuple[list[object] | str, list[int]]:
    """The flat key of one call (as a list) and the positions of its Python-scalar values, or a
    reason string (step aside) and [].

    Layout: func, grad, inference, default dtype, autocast state (see ``ambient``), len(args),
    then per argument: FastDTensor -> (its type, spec, requires_grad, flags) with flags =
    inference tensor | conj bit << 1 | neg bit << 2; list/tuple -> (type, len, elements...);
    slice -> (slice, start, stop, step entries); anything else -> (type, value) (so 2, 2.0 and
    True differ); then, when kwargs are given, the kw marker and (name, entry) per kwarg in call
    order. Hashability is checked at lookup.
    """
    key: list[object] = [func, grad, inference, default_dtype, autocast, len(args)]
    scalars: list[int] = []
    for a in args:
        reason = _entry(a, key, scalars, grad)
        if reason is not None:
            return reason, []
    if kwargs:
        key.append(_config["kw_marker"])
        for name, value in kwargs.items():
            key.append(name)
            reason = _entry(value, key, scalars, grad)
            if reason is not None:
                return reason, []
    return key, scalars


_SCALARS = (bool, int, float, complex)


def _entry(a: Any, key: list[object], scalars: list[int], grad: bool) -> str | None:
    """Append one argument's entry; a reason string when the call must step aside."""
    c = _config
    t = type(a)
    if t is c["fast_type"] or t is c["autograd_type"]:
        requires_grad = a.requires_grad
        if grad and requires_grad:
            return "autograd needed"
        key.append(t)
        key.append(a._spec)
        key.append(requires_grad)
        # NOTE: the wrapper's own flags, which its spec does not hold: torch checks them above
        # dispatch (in-place on an inference tensor outside inference mode raises) and the
        # conj/neg fallbacks read them before the call reaches the locals.
        key.append(a.is_inference() | a.is_conj() << 1 | a.is_neg() << 2)
        return None
    if isinstance(a, c["tensor_type"]):
        return "foreign tensor"
    if t is list or t is tuple:
        key.append(t)
        key.append(len(a))
        for e in a:
            reason = _entry(e, key, scalars, grad)
            if reason is not None:
                return reason
        return None
    if t is slice:
        key.append(t)
        for e in (a.start, a.stop, a.step):
            reason = _entry(e, key, scalars, grad)
            if reason is not None:
                return reason
        return None
    key.append(t)
    if t in _SCALARS:
        scalars.append(len(key))
    key.append(a)
    return None


def _unwrap(a: Any, fast_types: tuple[type, type], flat: list[Any], chunks: Any) -> Any:
    """``a`` with every FastDTensor (either role) replaced by its local tensor (DFS order appended
    to ``flat``); a chunked one (``chunks``: {flat index: (dim, offset, length)} or None) by its
    local chunk."""
    t = type(a)
    if t is fast_types[0] or t is fast_types[1]:
        flat.append(a)
        if chunks is not None:
            chunk = chunks.get(len(flat) - 1)
            if chunk is not None:
                return a._local_tensor.narrow(*chunk).clone()
        return a._local_tensor
    if t is list or t is tuple:
        return t(_unwrap(e, fast_types, flat, chunks) for e in a)
    return a


def torch_function(
    cls: type,
    func: Any,
    types: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    c = _config
    if kwargs is None:
        kwargs = {}
    # Block: pass-through (attribute reads and other calls that dispatch no aten op).
    if func in c["passthrough"]:
        return c["disabled"](func, types, args, kwargs)
    # Block: step aside under compile tracing or an active mode (the traced / observed program must
    # be stock's).
    cache = c["thread_cache"]()
    if c["is_compiling"]() or c["tf_mode"]() or c["dispatch_modes"]():
        return _step_aside(cache, func, types, args, kwargs, "mode or compiling")
    # Block: step aside for a view function (its output is an argument's view: never replayed).
    if func in c["view_functions"]:
        return _step_aside(cache, func, types, args, kwargs, "view function")
    # Block: key.
    grad = c["grad_enabled"]()
    inference = c["inference"]()
    default_dtype, autocast = ambient()
    # NOTE: reading requires_grad on a FastDTensor would re-enter this handler; torch function is
    # off for subclasses while the key is built.
    with c["disable_subclass"]():
        key_list, scalars = build_key(func, args, kwargs, grad, inference, default_dtype, autocast)
    if isinstance(key_list, str):
        return _step_aside(cache, func, types, args, kwargs, key_list)
    key = tuple(key_list)
    # Block: lookup.
    try:
        plan = cache.entries.get(key)
    except TypeError:
        return _step_aside(cache, func, types, args, kwargs, "unhashable argument")
    counters = cache.func_counters(func)
    if plan is None:
        # Block: miss. A negative entry for the call's structure (scalars by type) first.
        if scalars:
            structure = [c["structure_marker"], *key]
            value_marker = c["value_marker"]
            for position in scalars:
                structure[position + 1] = value_marker
            negative = cache.entries.get(tuple(structure))
            if negative is not None:
                counters[2] += 1
                cache.negative[negative] = cache.negative.get(negative, 0) + 1
                return c["disabled"](func, types, args, kwargs)
        else:
            structure = None
        counters[1] += 1
        return c["miss"](cache, func, types, args, kwargs, key, structure)
    cache.entries.move_to_end(key)
    if type(plan) is str:
        # Block: negative entry.
        counters[2] += 1
        cache.negative[plan] = cache.negative.get(plan, 0) + 1
        return c["disabled"](func, types, args, kwargs)
    # Block: custom handlers. NOTE: read live (loss_parallel() adds handlers in its context); a
    # handled op must reach torch's handler, which the plan, written without it, would skip.
    handlers = c["op_dispatcher"]._custom_op_handlers
    for op, _ in plan.ops:
        if op in handlers:
            return _step_aside(cache, func, types, args, kwargs, "custom handler")
    counters[0] += 1
    # Block: replay on the locals.
    fast_type = c["fast_type"]
    flat: list[Any] = []
    chunks = plan.chunks
    if chunks is not None:
        if getattr(c["explicit_local"], "_active", None) is not None:
            # Under ExplicitRedistributionContext every implicit redistribution must be observed
            # (and may raise): the dispatch path handles it.
            return _step_aside(cache, func, types, args, kwargs, "explicit redistribution context")
        chunks = {index: (dim, offset, length) for index, dim, offset, length in chunks}
    fast_types = (fast_type, c["autograd_type"])
    local_args = [_unwrap(a, fast_types, flat, chunks) for a in args]
    local_kwargs = {k: _unwrap(v, fast_types, flat, chunks) for k, v in kwargs.items()}
    if plan.below:
        # In-place: run below ADInplaceOrView, as the dispatch path does, so the locals' version
        # counters move exactly as stock's.
        with c["below_autograd"]():
            result = func(*local_args, **local_kwargs)
    else:
        result = func(*local_args, **local_kwargs)
    # The wrappers' counters move as stock's do (ADInplaceOrView bumps them above dispatch).
    for index, delta in plan.bumps:
        bumped = (flat[index],)
        for _ in range(delta):
            c["increment_version"](bumped)
    # Block: wrap outputs.
    return _output(plan.out, result, flat, fast_type, c["new"])


def _step_aside(
    cache: Any, func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], reason: str
) -> Any:
    cache.stepped_aside[reason] = cache.stepped_aside.get(reason, 0) + 1
    return _config["disabled"](func, types, args, kwargs)


def _output(entry: tuple[int, Any], result: Any, flat: list[Any], fast_type: type, new: Any) -> Any:
    kind, data = entry
    if kind == OUT_NEW:
        return new(fast_type, result, data, requires_grad=False)
    if kind == OUT_ARG:
        return flat[data]
    if kind == OUT_NONE:
        return None
    if kind == OUT_VIEW:
        spec, views = data
        base = result._base
        if base is None:
            # NOTE: the plan-time replay made a view; the key fixes every local's spec, so only a
            # local whose layout disagrees with its spec can lead here (as OUT_NEW's strides would).
            raise RuntimeError("dtdispatch: a replayed view output has no base")
        out = new(fast_type, base, spec, requires_grad=False)
        # Through FastDTensor's __torch_dispatch__ (torch function off for subclasses, so not back
        # into this handler): the view and its autograd metadata are made under the caller's grad
        # mode, as stock's are.
        with _config["disable_subclass"]():
            for op, rest in views:
                out = op(out, *rest)
        return out
    container, entries = data
    return container(
        [_output(e, r, flat, fast_type, new) for e, r in zip(entries, result, strict=True)]
    )
