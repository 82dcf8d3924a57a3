"""The path above dispatch: its per-thread plan cache and the miss that writes plans (ARCHITECTURE
"The path above dispatch").

The hot path is ``_native.function.torch_function`` (twin) / ``_native._function`` (C). On a
miss it calls ``miss``, which runs the call exactly as stock would (torch's disabled
``__torch_function__``, then FastDTensor's ``__torch_dispatch__`` below autograd) while observing
every aten op it dispatches, and then decides once whether the call may be replayed on the local
tensors:
- every aten op on FastDTensors ran a cached dispatch plan that is ``fast``, participating, not
  random, with no redistribution except a local chunk (Replicate -> Shard) of one public argument
  in a call of exactly one aten op, and no rewritten (global -> local) arguments where the public
  call passes sizes of its own (a composite's internal ones are checked below); no aten op ran on
  another tensor subclass; no random op on plain tensors; no op returned a non-tensor
  (data-dependent control flow);
- outputs are None, FastDTensors or tuples/lists of them; no fresh output aliases an argument's
  storage (stock ties those to their base: ``_base``, shared version counter); a view output is
  replayed only outside inference mode, in a call that mutates nothing, as a chain of aten view
  ops (non-tensor arguments only) from a fresh FastDTensor the call made (``_view_entry``);
  no fresh output requires grad or has a moved version counter;
- the arguments' specs, ``requires_grad`` and local tensor objects are unchanged;
- replaying the public call on clones of the arguments' locals reproduces the observed outputs
  and the arguments' final values bitwise (shape, stride, dtype, bytes), and the locals' version
  counters moved by the same amounts.
Anything else becomes a negative entry (a reason string): straight to the stock path from then on.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from dtdispatch import _compat
from dtdispatch import cache as _dispatch_cache
from dtdispatch._bitwise import comparable, same_bits
from dtdispatch._counted import CountedCache, Registry, add_counts, hit_totals
from dtdispatch._native.function import OUT_ARG, OUT_NEW, OUT_NONE, OUT_SEQ, OUT_VIEW
from dtdispatch._tensor import FAST_TYPES, AutogradFastDTensor, FastDTensor, role
from dtdispatch.local_results import random_ops

__all__ = [
    "AUTOGRAD_ENTRY_POINTS",
    "AboveCache",
    "TorchFunctionPlan",
    "autocast_state",
    "miss",
    "passthrough",
    "registry",
    "thread_cache",
]

VALUE_MARKER = object()
"""Stands for a Python scalar's value in a structure key (scalars by type)."""
STRUCTURE_MARKER = object()
"""Starts a structure key: the key of a call with its Python scalars' values left out."""

STEP_VARYING_LIMIT = 8
"""After this many misses of one call structure that differ only in Python scalar values, the
structure gets a negative entry ("step-varying scalar") and its per-value entries are dropped: a
per-step scalar (pytorch#178276) would otherwise pay a miss, i.e. an observed call plus a
verification replay, on every step, and hold up to the LRU capacity in dead entries."""

passthrough: dict[Any, bool] = {}
"""Funcs observed to dispatch no aten op and return no argument (attribute reads, ``dim()``,
setters): the hot path hands them straight to torch's disabled implementation, as stock does.
NOTE: process-wide and only ever grown; a wrong entry costs speed, never correctness (pass-through
is
stock behaviour)."""

_VIEW_METHODS = (
    "t", "transpose", "permute", "view", "view_as", "unsqueeze", "squeeze", "expand", "expand_as",
    "narrow", "select", "unflatten", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal",
    "unfold", "as_strided", "split", "split_with_sizes", "chunk", "unbind", "tensor_split",
    "adjoint", "detach",
)  # fmt: skip
_VIEW_PROPERTIES = ("T", "mT", "H", "mH")


def _view_functions() -> frozenset[Any]:
    found: set[Any] = set()
    for name in _VIEW_METHODS:
        for owner in (torch.Tensor, torch):
            func = getattr(owner, name, None)
            if func is not None:
                found.add(func)
    for name in _VIEW_PROPERTIES:
        prop = getattr(torch.Tensor, name, None)
        if prop is not None:
            found.add(prop.__get__)
    return frozenset(found)


view_functions = _view_functions()
"""Funcs whose output shares a FastDTensor argument's storage whenever one is their tensor
argument (``x.t()``, ``x.view(...)``, ``torch.chunk(x, 2)``, ``x.detach()`` ...): a replay would
make a fresh tensor where stock's output is the argument's view, so every key of theirs would hold
the negative entry "view output". The hot path steps aside for them before building a key
("view function"). NOTE: a wrong entry costs speed, never correctness (stepping aside is stock
behaviour)."""

_RANDOM_OPS = random_ops()
_SEEDED = torch.Tag.nondeterministic_seeded
_op_dispatcher = DTensor._op_dispatcher

_AUTOCAST_DEVICES = tuple(torch._C._autocast_supported_devices())


def autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """(device type, autocast dtype) for each device type with autocast on: what decides the
    dtypes autocast casts to. The key holds it only while some autocast is on (else None).
    NOTE: the autocast cache flag is left out: it decides whether a cast weight is reused, never
    its bits."""
    return tuple(
        (d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)
    )


def _autograd_entry_points() -> set[Any]:
    """Funcs that run the autograd engine or change autograd state: never replayed, never
    observed (a miss runs them as stock does and writes a negative entry)."""
    tensor = torch.Tensor
    funcs: set[Any] = {
        tensor.backward,
        tensor.register_hook,
        tensor.register_post_accumulate_grad_hook,
        tensor.retain_grad,
        tensor.requires_grad_,
        tensor.detach_,
        torch.autograd.backward,
        torch.autograd.grad,
    }
    for name in ("grad", "_grad", "requires_grad", "data", "grad_fn", "_backward_hooks"):
        descriptor = getattr(tensor, name, None)
        for method in ("__set__", "__delete__"):
            bound = getattr(descriptor, method, None)
            if bound is not None:
                funcs.add(bound)
    return funcs


AUTOGRAD_ENTRY_POINTS = _autograd_entry_points()
"""See ``_autograd_entry_point``; a denylist known to be incomplete, so a miss also replays only
what the observed call proves harmless to autograd (``_plan``)."""


def _autograd_entry_point(func: Any) -> bool:
    """Whether ``func`` is an autograd entry point or mutates autograd state: listed, from
    ``torch.autograd``, or an attribute setter."""
    try:
        if func in AUTOGRAD_ENTRY_POINTS:
            return True
    except TypeError:  # unhashable func: judged by the rest
        pass
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__name__", None) or ""
    return module.startswith("torch.autograd") or name in ("__set__", "__delete__")


class TorchFunctionPlan(NamedTuple):
    """How to replay one key on the locals. ``out`` is an output entry (see ``_native.function``);
    ``bumps`` holds (flat FastDTensor argument index, version delta) for arguments modified in
    place. NOTE: a tuple, so the C path reads its fields by index (out, bumps, below, chunks,
    ops)."""

    out: tuple[int, Any]
    bumps: tuple[tuple[int, int], ...]
    below: bool
    """Run the replay below ADInplaceOrView (the call mutated a tensor): the locals' version
    counters then move as on the dispatch path, where local ops run below autograd."""
    chunks: tuple[tuple[int, int, int, int], ...] | None
    """(flat index, dim, offset, length): that argument's local is replaced by
    ``local.narrow(dim, offset, length).clone()``, the dispatch plan's verified local chunk."""
    ops: tuple[tuple[Any, int], ...]
    """(aten op, its hash) of every op the observed call dispatched on FastDTensors. NOTE: torch's
    custom op handlers are read live (``loss_parallel()`` adds some on entering its context), and a
    handled op skips sharding propagation: the plan is replayed only while none of these ops has a
    handler. The hash is stored so the C path tests membership without calling ``__hash__``."""


def _empty_totals() -> dict[str, Any]:
    return {
        "hits": 0,
        "misses": 0,
        "entries": 0,
        "evictions": 0,
        "negative": {},
        "stepped_aside": {},
        "per_func": {},
    }


class AboveCache(CountedCache):
    """One thread's cache of the path above dispatch (bounded LRU, the dispatch cache's capacity)
    and its counters (see ``_counted.CountedCache``)."""

    __slots__ = ("negative", "per_func", "stepped_aside", "varying")

    def __init__(self) -> None:
        # per_func[func] = [hits, misses, negative]: lists so the hot path increments in place.
        self.per_func: dict[Any, list[int]] = {}
        self.negative: dict[str, int] = {}
        self.stepped_aside: dict[str, int] = {}
        # structure key -> the keys of its misses so far (bounded like entries).
        self.varying: OrderedDict[tuple[object, ...], list[tuple[object, ...]]] = OrderedDict()
        super().__init__(registry)

    def counters(self) -> tuple[Any, ...]:
        return (self.evicted, self.per_func, self.negative, self.stepped_aside)

    @staticmethod
    def counts(evicted: list[int], *counters: Any) -> dict[str, Any]:
        per_func_counts, negative, stepped_aside = counters
        per_func: dict[str, dict[str, int]] = {}
        for f, c in list(per_func_counts.items()):
            # Two funcs may share a name (a method and its Tensor.__get__ twin): their counts add.
            add_counts(per_func, {_func_name(f): {"hits": c[0], "misses": c[1], "negative": c[2]}})
        return {
            **hit_totals(per_func, evicted),
            "negative": dict(negative),
            "stepped_aside": dict(stepped_aside),
            "per_func": per_func,
        }

    def func_counters(self, func: Any) -> list[int]:
        counters = self.per_func.get(func)
        if counters is None:
            counters = self.per_func[func] = [0, 0, 0]
        return counters

    def insert(self, key: tuple[object, ...], value: TorchFunctionPlan | str) -> None:
        self.entries[key] = value
        self.evict_to(_dispatch_cache._default_capacity)

    def evict_to(self, capacity: int) -> None:
        super().evict_to(capacity)
        while len(self.varying) > capacity:
            self.varying.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()
        self.varying.clear()


def _func_name(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if name is not None and name.endswith("__get__"):
        return f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', '?')}.__get__"
    return str(name) if name else repr(func)


registry: Registry[AboveCache] = Registry(_empty_totals, AboveCache)
"""Every thread's cache above dispatch, and the counts of finished threads."""
thread_cache = registry.thread_cache


class _Observer(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Active only during a miss: forwards every aten op exactly as it would run without the mode,
    and records the first reason the call cannot be replayed (None while it can)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reason: str | None = None
        self.ops = 0
        self.mutates = False
        self.rewritten = False
        # (the chunked FastDTensor, dim, offset, length) of the local chunks (communication-free
        # Replicate -> Shard) the dispatch plans took.
        self.chunks: list[tuple[Any, int, int, int]] = []
        self.fast_ops = 0
        # An op dispatched under another graph task than the call's: the call ran the autograd
        # engine (a backward inside a composite), which a replay on the locals would not.
        self.graph_task = torch._C._current_graph_task_id()
        # The distinct aten ops dispatched on FastDTensors, in first-seen order.
        self.dispatched: dict[Any, None] = {}
        # id(output) -> (output, aten op, args, kwargs) of each FastDTensor an op on FastDTensors
        # returned (the output held, so its id stays its own): how a view output was made.
        self.made: dict[int, tuple[Any, Any, tuple[Any, ...], dict[str, Any]]] = {}

    def _block(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        if torch._C._current_graph_task_id() != self.graph_task:
            self._block("autograd engine")
        if func._schema.is_mutable:
            self.mutates = True
        if func in _RANDOM_OPS or _SEEDED in func.tags:
            # NOTE: the tag too: ops such as aten.dropout (whole under inference mode) draw from
            # the generator without being in torch's DTensor random-op set, and the plan-time
            # replay would draw again.
            self._block("random op")
        if any(t not in FAST_TYPES for t in types):
            # Another tensor subclass (a stock DTensor ...): let it run its own handler.
            self._block("foreign tensor op")
            return NotImplemented
        if types:
            self.dispatched[func] = None
            if func in _op_dispatcher._custom_op_handlers:
                # torch's handler decides (no sharding propagation, no dispatch plan): a plan cached
                # for this key while the op had no handler says nothing about this call.
                self._block("custom handler")
            result = FastDTensor.__torch_dispatch__(func, types, args, kwargs)  # type: ignore[no-untyped-call]
            self._check_plan(func, args, kwargs)
            if type(result) in FAST_TYPES:
                self.made[id(result)] = (result, func, args, kwargs)
        else:
            result = func(*args, **kwargs)
        if not _tensors_only(result):
            self._block("data-dependent")
        return result

    def _check_plan(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key = _dispatch_cache.build_key(func, args, kwargs)
        plan = None if key is None else _dispatch_cache.thread_cache().entries.get(key)
        if plan is None:
            self._block("uncached op")
        elif plan.random:
            self._block("random op")
        elif not plan.participating:
            self._block("non-participating rank")
        elif plan.communicates or (
            plan.chunks is None
            and plan.transforms is not None
            and any(t is not None for t in plan.transforms)
        ):
            self._block("redistribution")
        elif not plan.fast:
            self._block(f"dispatch plan: {plan.reason}")
        else:
            if plan.rewritten_args is not None:
                # Judged in _plan, which sees the public call's own arguments.
                self.rewritten = True
            self.fast_ops += 1
            for index, dim, offset, length in plan.chunks or ():
                if length is None:
                    # The local itself (a size-1 mesh dim, local_results._local_chunk): replayed as
                    # a full-length chunk. NOTE: the plan-time replay below compares the in-place
                    # effects, so a call that writes through that argument is refused.
                    length = args[index]._local_tensor.size(dim)
                self.chunks.append((args[index], dim, offset, length))


def _has_shape_values(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the public call passes any int (or sequence holding one): a size it may have
    computed from global shapes."""

    def sized(a: Any) -> bool:
        if type(a) is int or isinstance(a, torch.Size):
            return True
        return isinstance(a, (list, tuple)) and any(sized(e) for e in a)

    return any(sized(a) for a in args) or any(sized(v) for v in kwargs.values())


def _tensors_only(result: Any) -> bool:
    if result is None or isinstance(result, torch.Tensor):
        return True
    if isinstance(result, (tuple, list)):
        return all(_tensors_only(r) for r in result)
    return False


def _flat_fast(a: Any, flat: list[FastDTensor]) -> None:
    """FastDTensors of ``a`` in the hot path's DFS order (``_native.function._unwrap``)."""
    t = type(a)
    if t in FAST_TYPES:
        flat.append(a)
    elif t is list or t is tuple:
        for e in a:
            _flat_fast(e, flat)


def _autograd_state(t: torch.Tensor) -> tuple[Any, ...]:
    """What autograd holds for ``t`` besides ``requires_grad``: its node, hooks, whether it
    retains its grad, and the grad itself (read only where it may exist: reading a non-leaf's
    ``grad`` warns)."""
    retains = t.retains_grad
    grad = t.grad if t.is_leaf or retains else None
    hooks = t._backward_hooks
    return (t.grad_fn, tuple(hooks) if hooks else (), retains, grad)


def _same_autograd_state(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """The same node and grad tensor objects, the same hook handles and flag."""
    return a[0] is b[0] and a[1] == b[1] and a[2] == b[2] and a[3] is b[3]


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version
        return 0


def _exact_clone(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same shape, stride, dtype, conjugate and negative bits, inference-ness and
    stored bits (``clone`` may change strides; ``copy_`` into a fresh tensor would resolve the
    bits)."""
    # NOTE: the plan-time replay runs on these copies, and ops branch on inference-ness (outside
    # inference mode, ``stack`` of inference tensors returns a view, of normal ones a new tensor).
    with torch.inference_mode(t.is_inference()), torch.no_grad():
        if t.is_conj():
            return _exact_clone(t.conj()).conj()
        if t.is_neg():
            return torch._neg_view(_exact_clone(torch._neg_view(t)))
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        out.copy_(t)
    return out


def _storage_ptr(t: torch.Tensor) -> int | None:
    """The data pointer of ``t``'s storage, or None where it has none we can read (a wrapper or
    meta tensor...)."""
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


def _storages(flat: list[FastDTensor]) -> set[int | None]:
    return {_storage_ptr(t._local_tensor) for t in flat} - {0}


def _describe(
    result: Any,
    flat: list[FastDTensor],
    storages: set[int | None],
    observer: _Observer,
    fresh: set[tuple[str, int]],
) -> tuple[tuple[int, Any] | None, str]:
    """The output entry of an observed result, or (None, reason). ``fresh`` collects the storages
    of the fresh outputs described so far: outputs that share one are refused, since a replay
    wraps each on its own."""
    if result is None:
        return (OUT_NONE, None), ""
    for index, t in enumerate(flat):
        if result is t:
            return (OUT_ARG, index), ""
    if type(result) in FAST_TYPES:
        if result.requires_grad:
            return None, "output requires grad"
        ptr = _storage_ptr(result._local_tensor)
        if ptr is None or None in storages:
            return None, "unreadable storage"
        if ptr in storages:
            return None, "view output"
        if _version(result) != 0:
            return None, "output version"
        if ("storage", ptr) in fresh or ("object", id(result)) in fresh:
            return None, "aliased outputs"
        fresh.add(("object", id(result)))
        if ptr:
            fresh.add(("storage", ptr))
        if result._is_view():
            return _view_entry(result, flat, observer)
        return (OUT_NEW, result._spec), ""
    if isinstance(result, (tuple, list)):
        entries = []
        for r in result:
            if isinstance(r, (tuple, list)):
                return None, "nested output"
            entry, reason = _describe(r, flat, storages, observer, fresh)
            if entry is None:
                return None, reason
            entries.append(entry)
        return (OUT_SEQ, (type(result), tuple(entries))), ""
    if isinstance(result, torch.Tensor):
        return None, "output type"
    return None, "non-tensor output"


def _view_entry(
    result: FastDTensor, flat: list[FastDTensor], observer: _Observer
) -> tuple[tuple[int, Any] | None, str]:
    """The OUT_VIEW entry of a view output, or (None, "view output").

    Stock's view carries autograd view metadata (``_base``, a shared version counter, and made under
    no_grad, an error for a later in-place op with a grad-requiring operand) that a fresh wrapper
    lacks. It is replayed only as what it is: a chain of aten view ops, each applied to the
    previous one's output with non-tensor arguments only, from its ``_base``, a FastDTensor the
    call made itself (its storage is no argument's: checked by the caller). The replay applies the
    same chain through the dispatch path to the base wrapped around the local result's ``_base``.
    NOTE: not in inference mode (views there are untracked; kept refused as before), not in a
    call that mutates (the temporary may have been written after the view was taken), and not
    where torch never calls FastDTensor's ``__torch_dispatch__`` (torch < 2.13: its C++ DTensor
    path would make the replayed view a stock DTensor)."""
    if torch.is_inference_mode_enabled() or observer.mutates or not _compat.SUBCLASS_DISPATCH:
        return None, "view output"
    base = result._base
    made = observer.made
    if type(base) not in FAST_TYPES or any(base is t for t in flat):
        return None, "view output"
    producer = made.get(id(base))
    if producer is None or producer[0] is not base or base.requires_grad:
        return None, "view output"
    views: list[tuple[Any, tuple[Any, ...]]] = []
    current: Any = result
    while current is not base:
        producer = made.get(id(current))
        if producer is None or producer[0] is not current:
            return None, "view output"
        _, op, args, kwargs = producer
        if kwargs or not args or not op._schema._is_view_op() or _holds_tensor(args[1:]):
            return None, "view output"
        views.append((op, tuple(args[1:])))
        current = args[0]
    return (OUT_VIEW, (base._spec, tuple(reversed(views)))), ""


def _holds_tensor(a: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return True
    return isinstance(a, (list, tuple)) and any(_holds_tensor(e) for e in a)


def _fresh(replayed: torch.Tensor, observed: torch.Tensor, clones: list[Any]) -> bool:
    """Whether a replayed local aliases the arguments no more than stock's: no argument's local
    itself or its storage, and a view exactly where stock's local is one (a composite such as
    ``flatten`` branches on layout: on the wrapper's global strides in stock, on the local's in a
    replay, so the same call may copy in one and return a view of the argument in the other)."""
    if replayed._is_view() != observed._is_view() or any(replayed is c for c in clones):
        return False
    ptr = _storage_ptr(replayed)
    return ptr is not None and (ptr == 0 or all(ptr != _storage_ptr(c) for c in clones))


def _matches(entry: tuple[int, Any], observed: Any, replayed: Any, clones: list[Any]) -> bool:
    kind, data = entry
    if kind == OUT_NONE:
        return replayed is None
    if kind == OUT_ARG:
        return replayed is clones[data]
    if kind == OUT_NEW:
        return (
            type(replayed) is torch.Tensor
            and not replayed.requires_grad
            and same_bits(observed._local_tensor, replayed)
            and _fresh(replayed, observed._local_tensor, clones)
        )
    if kind == OUT_VIEW:
        # The base wrapped at replay is the local result's _base: it must be the observed base's
        # local (same layout and bits), so the recorded view ops make the observed output.
        return (
            type(replayed) is torch.Tensor
            and not replayed.requires_grad
            and replayed._is_view()
            and type(replayed._base) is torch.Tensor
            and same_bits(observed._local_tensor, replayed)
            and same_bits(observed._base._local_tensor, replayed._base)
            and _fresh(replayed._base, observed._base._local_tensor, clones)
        )
    entries = data[1]
    return (
        type(replayed) is type(observed)
        and len(replayed) == len(entries)
        and all(
            _matches(e, o, r, clones) for e, o, r in zip(entries, observed, replayed, strict=True)
        )
    )


def _with_local_clones(a: Any, clones: list[Any], position: list[int]) -> Any:
    t = type(a)
    if t in FAST_TYPES:
        clone = clones[position[0]]
        position[0] += 1
        return clone
    if t is list or t is tuple:
        return t(_with_local_clones(e, clones, position) for e in a)
    return a


def _plan(
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    flat: list[FastDTensor],
    before: list[tuple[Any, ...]],
    autograd_before: list[tuple[Any, ...]],
    result: Any,
    observer: _Observer,
) -> TorchFunctionPlan | str:
    """The replay plan of one observed call, or the reason it may not be replayed."""
    if observer.reason is not None:
        return observer.reason
    if observer.rewritten and _has_shape_values(args, kwargs):
        # A sharded view given global sizes by the caller (x.view(64)): the dispatch path rewrote
        # them to local sizes, which a replay on the locals would not.
        # NOTE: rewritten sizes that a composite derives from its input (F.linear flattening a 3-D
        # input: view(x, [b*s, d]) from x's own sizes) are replayable: on the locals the composite
        # derives local sizes itself. The comparison below checks that once, and it then holds for
        # every call of this key: the key fixes the global specs, so this rank's local shapes, and
        # every non-tensor value the composite reads.
        return "rewritten arguments"
    chunks = _public_chunks(observer, flat)
    if isinstance(chunks, str):
        return chunks
    entry, reason = _describe(result, flat, _storages(flat), observer, set())
    if entry is None:
        return reason
    bumps = []
    for index, (t, (local, _, spec, requires_grad, version, _), autograd) in enumerate(
        zip(flat, before, autograd_before, strict=True)
    ):
        if t._local_tensor is not local or t._spec != spec or t.requires_grad != requires_grad:
            return "argument metadata changed"
        try:
            after = _autograd_state(t)
        except RuntimeError:
            # NOTE: reading a view's node after an in-place op on it or its base rebuilds the node,
            # and raises for a view made under no_grad or one output of a multi-view op (split):
            # stock reads nothing here.
            return "autograd state unreadable"
        if not _same_autograd_state(after, autograd):
            return "autograd state changed"
        delta = _version(t) - version
        if delta:
            bumps.append((index, delta))
    # Replay the public call once on the clones and compare with what was observed.
    clones = [b[1] for b in before]
    clone_versions = [_version(c) for c in clones]
    chunked = list(clones)
    for index, dim, offset, length in chunks or ():
        chunked[index] = clones[index].narrow(dim, offset, length).clone()
    position = [0]
    local_args = [_with_local_clones(a, chunked, position) for a in args]
    local_kwargs = {k: _with_local_clones(v, chunked, position) for k, v in kwargs.items()}
    try:
        if observer.mutates:
            with torch._C._AutoDispatchBelowADInplaceOrView():
                replayed = func(*local_args, **local_kwargs)
        else:
            replayed = func(*local_args, **local_kwargs)
    except Exception:
        return "replay failed"
    if not _matches(entry, result, replayed, clones):
        return "replay differs"
    for t, (_, clone, _, _, _, local_version), clone_version in zip(
        flat, before, clone_versions, strict=True
    ):
        if not same_bits(t._local_tensor, clone):
            return "replay differs"
        if _version(t._local_tensor) - local_version != _version(clone) - clone_version:
            return "replay differs"
    return TorchFunctionPlan(
        out=entry,
        bumps=tuple(bumps),
        below=observer.mutates,
        chunks=chunks,
        ops=tuple((op, hash(op)) for op in observer.dispatched),
    )


def _public_chunks(
    observer: _Observer, flat: list[FastDTensor]
) -> tuple[tuple[int, int, int, int], ...] | str | None:
    """The observed local chunks as (flat index of the public argument, dim, offset, length), or a
    reason. Only a call that dispatched exactly one aten op can say which public argument was
    chunked: the chunked DTensor must be exactly one of the call's FastDTensor arguments."""
    if not observer.chunks:
        return None
    if observer.fast_ops != 1 or observer.ops != 1:
        return "redistribution"
    chunks = []
    for t, dim, offset, length in observer.chunks:
        indices = [i for i, a in enumerate(flat) if a is t]
        if len(indices) != 1:
            return "redistribution"
        chunks.append((indices[0], dim, offset, length))
    return tuple(chunks)


def miss(
    cache: AboveCache,
    func: Any,
    types: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: tuple[object, ...],
    structure: list[object] | None,
) -> Any:
    """Run one call as stock would while observing it; cache its replay plan or a negative entry
    (or, for a func that dispatched nothing, add it to ``passthrough``). Returns the call's result.
    """
    # NOTE: everything here reads FastDTensor attributes, which would re-enter the handler; the
    # observed call itself runs under torch's disabled implementation, i.e. with the same setting.
    with torch._C.DisableTorchFunctionSubclass():
        return _miss(cache, func, types, args, kwargs, key, structure)


def _miss(
    cache: AboveCache,
    func: Any,
    types: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: tuple[object, ...],
    structure: list[object] | None,
) -> Any:
    if _autograd_entry_point(func):
        # NOTE: not observed either: the engine may run this call's backward (reentrant
        # checkpointing) on tensors the observer would refuse to forward.
        cache.insert(key, "autograd entry point")
        return _stock(func, types, args, kwargs)
    flat: list[FastDTensor] = []
    for a in args:
        _flat_fast(a, flat)
    for v in kwargs.values():
        _flat_fast(v, flat)
    if not all(comparable(t._local_tensor) for t in flat):
        # NOTE: neither a plan nor a negative entry: a replay could not be verified (no values to
        # compare), and the key does not tell a meta local from the materialized one it becomes
        # (see _bitwise.comparable), so any entry would outlive the meta phase.
        return _stock(func, types, args, kwargs)
    try:
        before = [
            (
                t._local_tensor,
                _exact_clone(t._local_tensor),
                t._spec,
                t.requires_grad,
                _version(t),
                _version(t._local_tensor),
            )
            for t in flat
        ]
    except (RuntimeError, NotImplementedError):
        # Locals that cannot be copied exactly (meta, wrapper subclasses ...): never replayed.
        cache.insert(key, "unreadable storage")
        return _stock(func, types, args, kwargs)
    try:
        autograd_before = [_autograd_state(t) for t in flat]
    except RuntimeError:
        # A view whose node cannot be rebuilt (see _plan): stock's call decides what happens.
        cache.insert(key, "autograd state unreadable")
        return _stock(func, types, args, kwargs)
    observer = _Observer()
    with observer:
        result = _stock(func, types, args, kwargs)
    if observer.ops == 0 and not any(r is t for t in flat for r in _leaves(result)):
        passthrough[func] = True
        cache.entries.pop(key, None)
        return result
    value = _plan(func, args, kwargs, flat, before, autograd_before, result, observer)
    cache.insert(key, value)
    if structure is not None:
        structure_key = tuple(structure)
        seen = cache.varying.setdefault(structure_key, [])
        seen.append(key)
        if len(seen) >= STEP_VARYING_LIMIT:
            for stale in cache.varying.pop(structure_key):
                cache.entries.pop(stale, None)
            cache.insert(structure_key, "step-varying scalar")
    return result


def _leaves(result: Any) -> list[Any]:
    if isinstance(result, (tuple, list)):
        return [leaf for r in result for leaf in _leaves(r)]
    return [result]


def _retype(result: Any, inputs: set[int]) -> Any:
    """``result`` with each fresh stock DTensor turned into a FastDTensor in place."""
    if type(result) is DTensor:
        if id(result) not in inputs:
            # NOTE: the same object, retyped (same layout, no new autograd node, same grad_fn as
            # stock's). Only fresh outputs: a stock DTensor the caller passed in stays stock.
            result.__class__ = role(result.requires_grad)
        return result
    if isinstance(result, (tuple, list)):
        for r in result:
            _retype(r, inputs)
    return result


def stock_call(func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """torch < 2.13 (``_compat.SUBCLASS_DISPATCH`` False): torch's own path, outputs as
    FastDTensors, so a program stays on dtdispatch. torch's C++ DTensor path takes the call there
    (FastDTensor's ``__torch_dispatch__`` is never called) and returns stock DTensors."""
    result = torch._C._disabled_torch_function_impl(func, types, args, kwargs)
    inputs = {id(a) for a in args}
    inputs.update(id(e) for a in args if isinstance(a, (list, tuple)) for e in a)
    inputs.update(id(v) for v in kwargs.values())
    return _retype(result, inputs)


_stock = (
    torch._C._disabled_torch_function_impl if _compat.SUBCLASS_DISPATCH else stock_call
)
"""How a call takes torch's path: the disabled implementation (the dispatch path then runs below
autograd), or on torch < 2.13 ``stock_call``."""


def config() -> dict[str, Any]:
    """What ``_native.function.configure`` (and its C mirror) receives."""
    return {
        "fast_type": FastDTensor,
        "autograd_type": AutogradFastDTensor,
        "tensor_type": torch.Tensor,
        "new": torch.Tensor._dtensor__new__,
        "disabled": _stock,
        "passthrough": passthrough,
        "view_functions": view_functions,
        "thread_cache": thread_cache,
        "miss": miss,
        "is_compiling": _compat.is_compiling,
        "tf_mode": torch._C._is_torch_function_mode_enabled,
        "dispatch_modes": torch._C._len_torch_dispatch_stack,
        "grad_enabled": torch.is_grad_enabled,
        "inference": torch.is_inference_mode_enabled,
        "default_dtype": torch.get_default_dtype,
        "any_autocast": torch._C._is_any_autocast_enabled,
        "autocast_state": autocast_state,
        "disable_subclass": torch._C.DisableTorchFunctionSubclass,
        "increment_version": torch._C._increment_version,
        "explicit_local": _compat.explicit_redistribution_local,
        "op_dispatcher": _op_dispatcher,
        "below_autograd": torch._C._AutoDispatchBelowADInplaceOrView,
        "kw_marker": _dispatch_cache.KWARGS_MARKER,
        "value_marker": VALUE_MARKER,
        "structure_marker": STRUCTURE_MARKER,
    }
