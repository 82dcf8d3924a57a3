"""The Python twin of ``_speedups.c``: the specification of the native hot path.

``dispatch`` is FastDTensor's ``__torch_dispatch__``. It builds the key, looks up this thread's plan cache and,
on a hit whose plan is ``fast``, runs it inline: unwrap locals, call the op, wrap outputs, count. Everything
else goes to ``slow_path`` with a reason; never an exception of its own, never a guess. The C code mirrors each
block below, with a comment naming the block.
"""

from __future__ import annotations

from typing import Any

from dtdispatch.cache import build_key, thread_cache

__all__ = ["build_key", "configure", "dispatch"]

_config: dict[str, Any] = {}


def configure(config: dict[str, Any]) -> None:
    """Hand over what the hot path needs, resolved once: ``slow_path``, ``custom_ops``, ``dtensor_type``,
    ``fast_type``, ``new`` (``torch.Tensor._dtensor__new__``)."""
    _config.update(config)


def dispatch(cls: type, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
    c = _config
    if kwargs is None:
        kwargs = {}
    # Block: custom handlers (torch runs these before any sharding logic).
    if func in c["custom_ops"]:
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
    # Block: replay (participating, no redistribution, not random, new outputs, positional args only).
    dtensor_type = c["dtensor_type"]
    local = [a._local_tensor if isinstance(a, dtensor_type) else a for a in args]
    result = plan.op_call(*local)
    # Block: wrap.
    return _wrap(result, plan.output_spec, c["fast_type"], c["new"])


def _wrap(result: Any, spec: Any, fast_type: type, new: Any) -> Any:
    if spec is None:
        return result
    if isinstance(result, (tuple, list)):
        wrapped = [_wrap(r, s, fast_type, new) for r, s in zip(result, spec)]
        return tuple(wrapped) if isinstance(result, tuple) else wrapped
    if result is None:
        return None
    return new(fast_type, result, spec, requires_grad=result.requires_grad)
