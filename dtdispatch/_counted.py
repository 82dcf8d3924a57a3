"""Per-thread counted caches: what the dispatch plan cache (``cache.ThreadCache``) and the cache
above dispatch (``_above.AboveCache``) share (ARCHITECTURE "The plan cache").

A ``CountedCache`` is one thread's bounded LRU ``entries`` plus counter containers. Its
``Registry`` knows every live cache of its kind and keeps the counts of finished threads: when a
cache is freed with its thread, a finalizer folds its counters into the registry's retired totals.
``add_counts`` is the one way counters are merged (threads, retired totals, ``stats()``).
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["CountedCache", "Registry", "add_counts", "hit_totals"]


def add_counts(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Add ``part``'s numbers into ``total`` in place, leaf by leaf (dicts recurse; keys missing
    from ``total`` start at zero)."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


def hit_totals(per_key: dict[str, dict[str, int]], evicted: list[int]) -> dict[str, int]:
    """``hits`` and ``misses`` summed over ``per_key``'s counts, and ``evictions``: the first
    keys of every cache's ``counts``."""
    return {
        "hits": sum(c["hits"] for c in per_key.values()),
        "misses": sum(c["misses"] for c in per_key.values()),
        "evictions": evicted[0],
    }


C = TypeVar("C", bound="CountedCache")


class Registry(Generic[C]):
    """The live caches of one kind, each thread's own, and the counts of finished threads.

    ``empty`` makes the zeroed totals (every section present); ``make`` builds a thread's cache.
    NOTE: the lock guards the set of caches and the retired totals only: a cache itself is touched
    by its own thread alone, with the GIL held.
    """

    def __init__(self, empty: Callable[[], dict[str, Any]], make: Callable[[], C]) -> None:
        self._lock = threading.Lock()
        self._caches: weakref.WeakSet[C] = weakref.WeakSet()
        self._empty = empty
        self._make = make
        self._retired = empty()
        self._local = threading.local()

    def thread_cache(self) -> C:
        """This thread's cache, created on first use; freed with the thread."""
        cache: C | None = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = self._make()
        return cache

    def add(self, cache: C) -> None:
        with self._lock:
            self._caches.add(cache)

    def caches(self) -> list[C]:
        with self._lock:
            return list(self._caches)

    def retire(self, counts: dict[str, Any]) -> None:
        """Fold a finished thread's counts into the retired totals."""
        with self._lock:
            add_counts(self._retired, counts)

    def retired(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._retired)

    def reset_retired(self) -> None:
        with self._lock:
            self._retired = self._empty()

    def totals(self) -> dict[str, Any]:
        """Retired counts plus every live cache's snapshot, and ``entries``: the live entries."""
        total = self._empty()
        add_counts(total, self.retired())
        for cache in self.caches():
            add_counts(total, cache.snapshot())
        return total


class CountedCache:
    """One thread's bounded LRU ``entries`` and its counters.

    Subclasses declare their counter containers (dicts, and one-element list boxes) in
    ``counters()`` and turn them into a snapshot in ``counts()``, a static method: the finalizer
    calls it after the cache itself is gone.
    NOTE: not locked. Every method runs with the GIL held and a cache is only ever touched by its
    own thread, except ``snapshot()`` and clearing, which copy or empty whole containers. The C hot
    paths hold references to ``entries`` and the counter dicts: they are emptied in place, never
    replaced.
    """

    __slots__ = ("__weakref__", "entries", "evicted", "thread_name")

    def __init__(self, registry: Registry[Any]) -> None:
        self.entries: OrderedDict[tuple[object, ...], Any] = OrderedDict()
        self.evicted = [0]  # a box, so the finalizer can fold it in after the cache is gone
        self.thread_name = threading.current_thread().name
        registry.add(self)
        weakref.finalize(self, _retire, registry, type(self).counts, self.counters())

    def counters(self) -> tuple[Any, ...]:
        """The counter containers, in ``counts``'s parameter order (``evicted`` first)."""
        return (self.evicted,)

    @staticmethod
    def counts(evicted: list[int], *counters: Any) -> dict[str, Any]:
        return {"evictions": evicted[0]}

    def snapshot(self) -> dict[str, Any]:
        snap = type(self).counts(*self.counters())
        snap["entries"] = len(self.entries)
        return snap

    def reset_stats(self) -> None:
        for container in self.counters():
            if isinstance(container, dict):
                container.clear()
            else:
                container[0] = 0

    def evict_to(self, capacity: int) -> None:
        """Drop least recently used entries until at most ``capacity`` remain, counting each."""
        entries = self.entries
        while len(entries) > capacity:
            entries.popitem(last=False)
            self.evicted[0] += 1


def _retire(registry: Registry[Any], counts: Callable[..., dict[str, Any]], counters: Any) -> None:
    registry.retire(counts(*counters))
