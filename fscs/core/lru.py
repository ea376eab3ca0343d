"""The one in-memory cache of derived arrays (masks, maps, tokens, predictions): least recently used goes.

A cache is bounded by a count (``maxsize``), by bytes (``max_bytes``: the arrays it holds, `nbytes`), or both;
what it holds never changes a value, only whether it is computed again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np


def nbytes(value: Any) -> int:
    """Bytes of the arrays in ``value`` (a numpy array, torch tensor, or a tuple / list / dict of them)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if hasattr(value, "element_size") and hasattr(value, "numel"):  # torch.Tensor, without importing torch
        return int(value.element_size() * value.numel())
    if isinstance(value, tuple | list):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    return 0


class LRUCache(OrderedDict):
    """A dict that keeps its ``maxsize`` most recently used entries (every entry when ``maxsize`` is None)
    and, with ``max_bytes``, at most that many bytes of arrays (one entry larger than that is still kept)."""

    def __init__(self, maxsize: int | None = None, max_bytes: int | None = None):
        super().__init__()
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.bytes = 0  # bytes held (counted only with ``max_bytes``)
        self.peak_bytes = 0  # the most bytes held after a trim (a new entry is counted once it is kept)

    def get_or(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value cached under ``key``, else ``make()``, stored (evicting the least recently used)."""
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` under ``key``, then evict down to the bounds."""
        self[key] = value
        self.trim()

    def __setitem__(self, key: Hashable, value: Any) -> None:
        if self.max_bytes is not None:
            if key in self:
                self.bytes -= nbytes(OrderedDict.__getitem__(self, key))
            self.bytes += nbytes(value)
        super().__setitem__(key, value)
        self.move_to_end(key)

    def __delitem__(self, key: Hashable) -> None:
        if self.max_bytes is not None:
            self.bytes -= nbytes(OrderedDict.__getitem__(self, key))
        super().__delitem__(key)

    def pop(self, key: Hashable, *default: Any) -> Any:
        if key not in self:
            return super().pop(key, *default)
        value = super().pop(key)
        if self.max_bytes is not None:
            self.bytes -= nbytes(value)
        return value

    def popitem(self, last: bool = True) -> tuple[Hashable, Any]:
        key, value = super().popitem(last=last)
        if self.max_bytes is not None:
            self.bytes -= nbytes(value)
        return key, value

    def clear(self) -> None:
        super().clear()
        self.bytes = 0

    def trim(self) -> None:
        """Evict the least recently used entries until both bounds hold (the newest entry always stays)."""
        while self.maxsize is not None and len(self) > self.maxsize:
            self.popitem(last=False)
        while self.max_bytes is not None and self.bytes > self.max_bytes and len(self) > 1:
            self.popitem(last=False)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
