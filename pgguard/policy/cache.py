"""A small bounded cache for decisions, cheap enough for the per-statement hot path.

Owns: `BoundedCache`, a dict with first-in-first-out eviction. FIFO instead of LRU keeps a hit
to one dict lookup (no reordering); repetitive workloads re-insert anything evicted on its next
miss. Operations are single dict calls, so concurrent use from asyncio tasks (and threads, under
the GIL) cannot corrupt it; at worst two callers compute the same entry.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """At most `capacity` entries; the oldest insertion is evicted first."""

    __slots__ = ("_data", "capacity", "get")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._data: dict[K, V] = {}
        self.get = self._data.get

    def put(self, key: K, value: V) -> None:
        if self.capacity == 0:
            return
        data = self._data
        if key not in data and len(data) >= self.capacity:
            try:
                del data[next(iter(data))]
            except (StopIteration, KeyError, RuntimeError):
                data.clear()
        data[key] = value

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
