"""An ordered cache that knows its size in bytes without looking at its tensors.

Caches charged to a memory ledger (`ModelManager.register_cache`) are asked for their
bytes many times per request; walking every cached tensor on each ask made the steady
state's management time grow with what is cached. A `SizedCache` measures an entry
once, when it is put, and keeps the total as entries come and go, so `nbytes()` is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import MutableMapping
from typing import Callable, Generic, Iterator, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class SizedCache(MutableMapping, Generic[K, V]):
    """An OrderedDict (oldest first) whose entries are measured by `measure` once, on insertion.

    Entries must not change size while cached (replace them instead)."""

    def __init__(self, measure: Callable[[V], int]) -> None:
        self._measure = measure
        self._entries: "OrderedDict[K, V]" = OrderedDict()
        self._sizes: dict[K, int] = {}
        self._total = 0

    def nbytes(self) -> int:
        return self._total

    def size_of(self, key: K) -> int:
        return self._sizes[key]

    def __getitem__(self, key: K) -> V:
        return self._entries[key]

    def __setitem__(self, key: K, value: V) -> None:
        if key in self._entries:
            del self[key]
        size = int(self._measure(value))
        self._entries[key] = value
        self._sizes[key] = size
        self._total += size

    def __delitem__(self, key: K) -> None:
        del self._entries[key]
        self._total -= self._sizes.pop(key)

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def move_to_end(self, key: K, last: bool = True) -> None:
        self._entries.move_to_end(key, last)

    def popitem(self, last: bool = True) -> tuple[K, V]:
        key, value = self._entries.popitem(last)
        self._total -= self._sizes.pop(key)
        return key, value

    def clear(self) -> None:
        self._entries.clear()
        self._sizes.clear()
        self._total = 0
