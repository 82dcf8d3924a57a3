"""The Python twin of ``_dispatch.c``: the specification of the native hot path.

``dispatch`` is FastDTensor's ``__torch_dispatch__``. It builds the key, looks up this thread's plan
cache and, on a hit whose plan is ``fast``, runs it inline: unwrap locals, call the op, wrap
outputs, count. Everything else goes to ``slow_path`` with a reason; never an exception of its own,
never a guess. The C code mirrors each block below, with a comment naming the block.
"""

from __future__ import annotations

from typing import Any

from dtdispatch.cache import INPLACE, OUT, VIEW, build_key, thread_cache

__all__ = ["build_key", "configure", "dispatch"]

_config: dict[str, Any] = {}


def configure(config: dict[str, Any]) -> None:
    """Hand over what the hot path needs, resolved once: ``slow_path``, ``op_dispatcher``
    (torch's ``DTensor._op_dispatcher``: its ``_custom_op_handlers`` are read on every call),
    ``dtensor_type``, ``fast_type``, ``autograd_type`` (the replay and autograd roles),
    ``grad_enabled``, ``graph_task_id`` (``torch._C._current_graph_task_id``: -1 outside a
    backward pass), ``new`` (``torch.Tensor._dtensor__new__``),
    ``torch_function_mode_enabled`` (``torch._C._is_torch_function_mode_enabled``) ..."""
    _config.update(config)


def dispatch(
    cls: type,
    func: Any,
    types: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    c = _config
    if kwargs is None:
        kwargs = {}
    # Block: custom handlers (torch runs these before any sharding logic). NOTE: read live, never
    # snapshotted: loss_parallel() adds its handlers on entering the context and removes them on
    # leaving it, context parallel replaces the whole dict, and users register handlers after
    # import. Handled ops are never cached, and this check comes before the cache lookup, so a plan
    # made while an op had no handler is never replayed while it has one.
    if func in c["op_dispatcher"]._custom_op_handlers:
        return c["slow_path"](func, args, kwargs, "custom handler", None, None)
    # Block: key.
    key = build_key(func, args, kwargs)
    if key is None:
        return c["slow_path"](func, args, kwargs, "no key", None, None)
    # Block: lookup.
    cache = thread_cache()
    plan = cache.entries.get(key)
    counters = cache.op_counters(func)
    if plan is None:
        counters[1] += 1
        return c["slow_path"](func, args, kwargs, "miss", key, None)
    cache.entries.move_to_end(key)
    counters[0] += 1
    if not plan.fast:
        return c["slow_path"](func, args, kwargs, plan.reason, key, plan)
    chunks = plan.chunks
    if chunks is not None and getattr(c["explicit_local"], "_active", None) is not None:
        # Under ExplicitRedistributionContext every implicit redistribution must be observed (and
        # may raise).
        return c["slow_path"](func, args, kwargs, "explicit redistribution context", key, plan)
    # Block: unwrap (the plan is participating, not random, and communicates nothing).
    dtensor_type = c["dtensor_type"]
    if plan.needs_pytree:
        # aten lists nest one level: unwrap DTensors inside list/tuple arguments.
        local: list[Any] = [
            type(a)(e._local_tensor if isinstance(e, dtensor_type) else e for e in a)
            if type(a) is list or type(a) is tuple
            else (a._local_tensor if isinstance(a, dtensor_type) else a)
            for a in args
        ]
    elif plan.rewritten_args is None:
        local = [a._local_tensor if isinstance(a, dtensor_type) else a for a in args]
    else:
        # Sharded views: non-tensor positions take the plan's rewritten values (local shapes), and
        # values the rewrite appended come last.
        rewritten = plan.rewritten_args
        tensor_type = c["tensor_type"]
        local = [
            a._local_tensor
            if isinstance(a, dtensor_type)
            else (a if isinstance(a, tensor_type) else rewritten[i])
            for i, a in enumerate(args)
        ]
        local.extend(rewritten[len(args) :])
    # Block: local chunks.
    if chunks is not None:
        # Communication-free redistribution (Replicate -> Shard): the plan's verified local chunk.
        # Length None: torch hands the local itself back (a size-1 mesh dim), so it is used as is.
        for index, dim, offset, length in chunks:
            if length is not None:
                local[index] = local[index].narrow(dim, offset, length).clone()
    # Block: local op.
    if kwargs:
        local_kwargs = {
            k: (v._local_tensor if isinstance(v, dtensor_type) else v) for k, v in kwargs.items()
        }
        result = plan.op_call(*local, **local_kwargs)
    elif (
        plan.local_call is not None
        and not c["torch_function_mode_enabled"]()
        and _plain_tensors(local, c["tensor_type"])
    ):
        # The public function verified when planned (DispatchPlan.local_call): it skips
        # OpOverload._op's second, schema-driven parse of the arguments. NOTE: a torch function
        # mode, or a local tensor subclass's __torch_function__, would see it instead of the aten op
        # (the key holds neither), so then op_call stays.
        result = plan.local_call(*local)
    else:
        result = plan.op_call(*local)
    # Block: return, by output kind (torch's _dispatch_fast_path_python_tail and wrap).
    kind = plan.kind
    if kind == INPLACE:
        # The plan is fast only when placements do not change: return self, as torch does.
        return args[0] if plan.output_spec is not None else None
    # Block: out= outputs.
    if kind == OUT:
        spec = plan.output_spec
        specs = spec if isinstance(spec, tuple) else (spec,)
        outs = [kwargs[name] for name in plan.out_names]
        for out, out_spec in zip(outs, specs, strict=False):
            out._spec = out_spec
        return tuple(outs) if len(outs) > 1 else outs[0]
    # Block: role (ARCHITECTURE "Two roles: replay and autograd"). When an argument is in the
    # autograd role (read from ``types``, the distinct types of the call's tensor arguments, list
    # elements and keywords included, which torch hands over: the roles are sibling types, so
    # torch's choice of ``cls`` follows argument order), the outputs take that role under grad
    # mode, in a backward pass (gradients) and when every DTensor argument is in it (an optimizer
    # step on parameters, gradients and states: no handler ran, none would replay); a no-grad call
    # mixing roles makes replay-role outputs (an inference forward's activations).
    # NOTE: torch checks that some outputs keep their input's type (a view and its base;
    # ``nn.Parameter``: ``x.detach()``; ``deepcopy``: ``x.clone()`` under no_grad), so a view
    # takes its base's role; a call on one FastDTensor keeps its role by the rule above.
    out_type = c["fast_type"]
    autograd_type = c["autograd_type"]
    if autograd_type in types:
        if kind == VIEW:
            if type(args[0]) is autograd_type:
                out_type = autograd_type
        elif (
            c["grad_enabled"]()
            or c["graph_task_id"]() != -1
            or _all_in_role(types, autograd_type, dtensor_type)
        ):
            out_type = autograd_type
    wrapped = _wrap(result, plan.output_spec, out_type, c["new"], c["tensor_type"])
    # Block: view aliasing.
    if kind == VIEW:
        # return_and_correct_aliasing's storage fix for views (torch._functionalize_unsafe_set).
        outs_tuple = wrapped if isinstance(wrapped, tuple) else (wrapped,)
        unsafe_set = c["unsafe_set"]
        for arg_index, return_index in plan.alias_pairs:
            ret = outs_tuple[return_index]
            for r in ret if isinstance(ret, list) else (ret,):
                unsafe_set(r, args[arg_index])
    return wrapped


def _all_in_role(types: Any, cls: type, dtensor_type: type) -> bool:
    """Every DTensor type among ``types`` is ``cls``."""
    return all(t is cls or not issubclass(t, dtensor_type) for t in types)


def _plain_tensors(values: list[Any], tensor_type: type[Any]) -> bool:
    """Every tensor among ``values`` is exactly ``tensor_type`` (no subclass)."""
    return all(type(v) is tensor_type or not isinstance(v, tensor_type) for v in values)


def _wrap(result: Any, spec: Any, fast_type: type, new: Any, tensor_type: type[Any]) -> Any:
    """torch's ``OpDispatcher.wrap`` with FastDTensor outputs (a spec-less tensor output is a 0-d
    tensor)."""
    if isinstance(result, tensor_type):
        if spec is None:
            return result
        # requires_grad passed by position: a keyword costs torch's parser a kwargs dict per call.
        return new(fast_type, result, spec, result.requires_grad)
    if isinstance(result, (tuple, list)):
        wrapped = [
            _wrap(r, s, fast_type, new, tensor_type) for r, s in zip(result, spec, strict=False)
        ]
        return tuple(wrapped) if isinstance(result, tuple) else wrapped
    return result
