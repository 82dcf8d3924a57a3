"""The sharding cache key, the plan and the per-thread plan cache.

The key rules are ARCHITECTURE "The cache key" (torch 2.13's ``OpSchema`` comparison key), with two
declared
deviations: scalars of ``scalar_value_free_ops`` are keyed by type (coarser), and non-float values
torch leaves out are keyed by value (finer, see ``_is_float_value``). ``build_key`` is the
specification that ``_native/_dispatch.c`` mirrors block by block; change both together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch._ops import OpOverload
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

from dtdispatch import _compat
from dtdispatch._counted import CountedCache, Registry, hit_totals

__all__ = [
    "KWARGS_MARKER",
    "DispatchPlan",
    "ThreadCache",
    "build_key",
    "registry",
    "scalar_value_free_ops",
    "schema_info",
    "thread_cache",
]

_propagator = DTensor._op_dispatcher.sharding_propagator

# Marker objects inside keys. They are module singletons so the C code can compare by identity.
KWARGS_MARKER = object()
"""Separates positional entries from kwarg entries in a key: the (name, value) pairs of this key
and the kwargs of the key above dispatch (``_above``) alike."""
_LIST = object()
"""Starts a list argument's entry: (_LIST, len, elements...)."""
_SCALAR_TENSOR = object()
"""A plain one-element tensor taken as Replicate: (_SCALAR_TENSOR, shape, stride, dtype)."""
_UNKEYED = object()
"""A float argument whose value torch leaves out of the key (index < static_argnum)."""

_DEFAULT_SCHEMA_INFO = RuntimeSchemaInfo()


def schema_info(op: OpOverload) -> RuntimeSchemaInfo:
    """torch's declared ``RuntimeSchemaInfo`` for ``op`` (read at run time, never a copy)."""
    info = _propagator.op_to_schema_info.get(op)
    if info is None:
        info = _compat.single_dim_schema_infos.get(op)
    return _DEFAULT_SCHEMA_INFO if info is None else info


def _is_torch_pointwise_rule(op: OpOverload) -> bool:
    entry = _compat.single_dim_strategy_funcs.get(op)
    func = getattr(entry, "func", None)
    return (
        getattr(func, "__qualname__", "") == "_register_single_dim_pointwise.<locals>.strategy_fn"
    )


def scalar_value_free_ops() -> frozenset[OpOverload]:
    """Ops whose Python-scalar arguments enter the key by type, not by value.

    torch 2.13 registers every pointwise op with ``static_argnum=0``, so ``x / 0.999`` and
    ``x / 0.998`` get different cache entries: an optimizer's step-varying bias corrections add one
    entry per step (pytorch#178276 and kin). The pointwise rule
    (``_register_single_dim_pointwise``'s ``strategy_fn``) reads only the tensor arguments'
    metadata, and the output's metadata depends on a scalar's type (dtype promotion), never its
    value. So for exactly these ops the key holds ``type(scalar)``.
    NOTE: the set is derived from torch's registry at import; do not hand-maintain it. An op
    registered with any other rule keeps torch's value keys.
    """
    return frozenset(op for op in _compat.single_dim_strategy_funcs if _is_torch_pointwise_rule(op))


_VALUE_FREE_OPS = scalar_value_free_ops()
_SCALAR_TYPES = (bool, int, float, complex)
_UNKEYED_TYPES = (float, complex)


def _is_float_value(value: object) -> bool:
    """A float/complex scalar, or a non-empty list/tuple of them.

    NOTE: these are the only values left out of the key where torch leaves them out (index <
    static_argnum), outside the value-free ops (which keep torch's rule). torch's keys omit
    arguments that decide the output's metadata: topk's ``k`` and histc's ``bins`` (output shape),
    ``view.dtype``'s dtype (output dtype and shape), multinomial's ``num_samples``; torch then
    replays the first call's output spec for the second (stock returns a DTensor whose shape
    disagrees with its local tensor). So every other value (ints, bools, int lists, dtypes,
    strings) is keyed by value. Floats stay out: they are the step-varying values (dropout ``p``,
    ``normal_``'s mean and std, ``fill_``'s value, foreach scalar lists) and no op's output
    metadata was found to depend on one.
    """
    if type(value) in _UNKEYED_TYPES:
        return True
    if type(value) is not list and type(value) is not tuple:
        return False
    items: list[object] | tuple[object, ...] = value
    return len(items) > 0 and all(type(e) in _UNKEYED_TYPES for e in items)


def _tensor_entry(arg: torch.Tensor) -> object | None:
    """Rules 2-3 for one tensor: its spec, a scalar-tensor marker, or None (no key)."""
    if isinstance(arg, DTensor):
        spec = arg._spec
        meta = spec.tensor_meta
        # NOTE: symbolic sizes belong to one trace's ShapeEnv; caching them replays stale symbols.
        if meta is None or not all(type(s) is int for s in meta.shape):
            return None
        return spec
    if arg.numel() == 1 and arg.ndim == 0:
        # NOTE: ndim == 0 only: a (1,)-shaped plain tensor makes torch warn on every call, so it
        # takes the slow path, which warns exactly as torch does.
        return (_SCALAR_TENSOR, tuple(arg.shape), arg.stride(), arg.dtype)
    # Non-scalar plain tensor: torch raises (or replicates under implicit replication) on the slow
    # path.
    return None


def _value_entry(value: object, keyed: bool, by_type: bool) -> object:
    if value is None:
        return None
    if not keyed and (by_type or _is_float_value(value)):
        return _UNKEYED
    if by_type and type(value) in _SCALAR_TYPES:
        return type(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def build_key(
    op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[object, ...] | None:
    """The plan-cache key of one call, or None when the call must not be cached (ARCHITECTURE "The
    cache key").

    Two calls get equal keys exactly when torch's ``OpSchema`` comparison keys are equal (tested
    against torch), except that scalars of ``scalar_value_free_ops`` are keyed by type.
    """
    info = schema_info(op)
    static_argnum = info.static_argnum
    by_type = op in _VALUE_FREE_OPS
    # Rule 1: args arrive with trailing defaulted arguments already dropped by the dispatcher, so
    # len(args) is torch's args_schema_len.
    key: list[object] = [op, len(args)]
    has_dtensor = False
    for index, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            entry = _tensor_entry(arg)
            if entry is None:
                return None
            has_dtensor = has_dtensor or isinstance(arg, DTensor)
            key.append(entry)
        elif isinstance(arg, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in arg):
            # Rule 4: a list holding tensors (cat, stack, _foreach_*).
            key.append(_LIST)
            key.append(len(arg))
            for element in arg:
                if isinstance(element, torch.Tensor):
                    entry = _tensor_entry(element)
                    if entry is None:
                        return None
                    has_dtensor = has_dtensor or isinstance(element, DTensor)
                    key.append(entry)
                else:
                    key.append(_value_entry(element, index >= static_argnum, by_type))
        else:
            # Rule 5.
            key.append(_value_entry(arg, index >= static_argnum, by_type))
    if kwargs:
        # Rule 6. NOTE: tensor kwargs always enter the key, even where torch's static_kwargkey is
        # None: a finer key only costs a miss, a coarser one replays the wrong spec.
        # The separator only appears when an entry follows, so kwargs that do not count (alpha=2 on
        # add) leave the key equal to the call without them, as in torch.
        static_kwargs = info.static_kwargkey or ()
        separated = False
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                entry = _tensor_entry(value)
                if entry is None:
                    return None
                has_dtensor = has_dtensor or isinstance(value, DTensor)
            elif name in static_kwargs:
                entry = _value_entry(value, True, by_type)
            elif isinstance(value, (list, tuple)) and any(
                isinstance(e, torch.Tensor) for e in value
            ):
                return None  # tensor lists in kwargs are rare; let the slow path decide each time
            else:
                continue
            if not separated:
                key.append(KWARGS_MARKER)
                separated = True
            key.append((name, entry))
    # Rule 7: no DTensor anywhere means torch's "no mesh" error, raised by the slow path.
    return tuple(key) if has_dtensor else None


# Output kinds of a plan.
NEW = 0
VIEW = 1
INPLACE = 2
OUT = 3
EQUAL = 4


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    """What the slow path decided for one key; replayed on every hit. Treat as immutable.

    ``transforms`` has one entry per flattened positional argument: None (use the local tensor as
    is) or the target ``DTensorSpec`` to redistribute to. ``rewritten_args`` holds the flattened
    positional values that replace non-tensor arguments (sharded view shapes), or None. ``fast`` is
    True when the native path may run the plan without Python (see
    ``_native.dispatch.dispatch``); otherwise ``reason`` names why not.
    """

    op_call: OpOverload
    mesh: Any
    output_spec: Any
    kind: int
    transforms: tuple[DTensorSpec | None, ...] | None
    communicates: bool
    rewritten_args: tuple[object, ...] | None
    needs_pytree: bool
    random: bool
    participating: bool
    fast: bool
    reason: str
    out_names: tuple[str, ...]
    """OUT plans: the ``out=`` argument names in schema order (their specs are ``output_spec``)."""
    chunks: tuple[tuple[int, int, int, int | None], ...] | None
    """Communication-free transforms the native path replays: (argument index, dim, offset,
    length), each ``local.narrow(dim, offset, length).clone()`` — verified equal to torch's
    redistribution when planned."""
    alias_pairs: tuple[tuple[int, int], ...]
    """VIEW plans: (argument index, return index) pairs whose storages
    ``return_and_correct_aliasing`` ties."""
    masks: tuple[Any, ...] = ()
    """The ``_MaskPartial`` placements the transforms create (vocab-parallel embedding, gather):
    templates only. A mask buffer is per-call state, so ``execute`` swaps each for a fresh copy on
    every call (``local_results._fresh_masks``), and such a plan is never ``fast``."""
    local_call: Any = None
    """A public torch function (or ``TensorBase`` method) verified when planned to dispatch exactly
    ``op_call`` with the same arguments (``local_results.verified_local_call``), or None. The native
    path calls it instead of ``op_call`` for calls without kwargs while no torch function mode is
    active: it skips ``OpOverload._op``'s second, schema-driven parse of the arguments."""


_default_capacity = 4096


def _empty_totals() -> dict[str, Any]:
    return {
        "hits": 0,
        "misses": 0,
        "entries": 0,
        "evictions": 0,
        "bailouts": {},
        "per_op": {},
        "bailouts_per_op": {},
    }


class ThreadCache(CountedCache):
    """One thread's plan cache (bounded LRU) and its counters (see ``_counted.CountedCache``)."""

    __slots__ = ("bailouts", "capacity", "op_bailouts", "per_op")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # per_op[op] = [hits, misses, bailouts]: lists so the hot path increments in place.
        self.per_op: dict[OpOverload, list[int]] = {}
        self.bailouts: dict[str, int] = {}
        # op_bailouts[op][reason]: the slow path's per-op breakdown (telemetry's per-op table).
        self.op_bailouts: dict[OpOverload, dict[str, int]] = {}
        super().__init__(registry)

    def counters(self) -> tuple[Any, ...]:
        return (self.evicted, self.per_op, self.bailouts, self.op_bailouts)

    @staticmethod
    def counts(evicted: list[int], *counters: Any) -> dict[str, Any]:
        per_op_counts, bailouts, op_bailouts = counters
        per_op = {
            str(op): {"hits": c[0], "misses": c[1], "bailouts": c[2]}
            for op, c in list(per_op_counts.items())
        }
        return {
            **hit_totals(per_op, evicted),
            "bailouts": dict(bailouts),
            "per_op": per_op,
            "bailouts_per_op": {str(op): dict(r) for op, r in list(op_bailouts.items())},
        }

    def insert(self, key: tuple[object, ...], plan: DispatchPlan) -> None:
        self.entries[key] = plan
        self.evict_to(self.capacity)

    def count_bailout(self, op: OpOverload, reason: str) -> None:
        self.bailouts[reason] = self.bailouts.get(reason, 0) + 1
        reasons = self.op_bailouts.get(op)
        if reasons is None:
            reasons = self.op_bailouts[op] = {}
        reasons[reason] = reasons.get(reason, 0) + 1
        self.op_counters(op)[2] += 1

    def op_counters(self, op: OpOverload) -> list[int]:
        counters = self.per_op.get(op)
        if counters is None:
            counters = self.per_op[op] = [0, 0, 0]
        return counters


registry: Registry[ThreadCache] = Registry(_empty_totals, lambda: ThreadCache(_default_capacity))
"""Every thread's plan cache, and the counts of finished threads."""
thread_cache = registry.thread_cache


def set_default_capacity(capacity: int) -> None:
    global _default_capacity
    _default_capacity = capacity
    for cache in registry.caches():
        cache.capacity = capacity
        cache.evict_to(capacity)
