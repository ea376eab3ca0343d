"""The one in-memory cache of derived arrays (masks, maps, tokens, predictions): least recently used goes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRUCache(OrderedDict):
    """A dict that keeps its ``maxsize`` most recently used entries (every entry when ``maxsize`` is None)."""

    def __init__(self, maxsize: int | None = None):
        super().__init__()
        self.maxsize = maxsize

    def get_or(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value cached under ``key``, else ``make()``, stored (evicting the least recently used)."""
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` under ``key``, then evict down to ``maxsize``."""
        self[key] = value
        self.trim()

    def trim(self) -> None:
        """Evict the least recently used entries until at most ``maxsize`` are left."""
        while self.maxsize is not None and len(self) > self.maxsize:
            self.popitem(last=False)
