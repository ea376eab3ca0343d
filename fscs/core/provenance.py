"""The one comparison of recorded attributes (a store's, a checkpoint's, a derived file's) with expected ones,
and the store attributes every derived file records."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fscs.core.errors import FscsError

#: Store attributes copied into derived files (pseudo-labels, enhancer) and checked when one is read back.
DERIVED = ("backbone", "weights_sha256", "input_size", "patch_size", "grid", "num_heads", "precision")


def plain(value: Any) -> Any:
    """An attribute value as plain Python: numpy scalars -> items, arrays and tuples -> lists, recursively."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def same(a: Any, b: Any) -> bool:
    """Whether two attribute values are equal once plain (a tuple equals the list of the same items)."""
    return plain(a) == plain(b)


def check_provenance(
    found: Mapping[str, Any],
    expected: Mapping[str, Any],
    what: str,
    mismatch: Callable[[str, Any, Any], str],
    missing: Callable[[str, Any], str] | None = None,
    equal: Callable[[str, Any, Any], bool] | None = None,
) -> None:
    """FscsError ``"{what}: {mismatch(key, found, expected)}"`` at the first key of ``expected`` (its order)
    whose value in ``found`` differs (``equal``, default `same`). A key absent from ``found`` raises
    ``missing(key, expected)`` when given, else compares as None."""
    equal = equal or (lambda _key, have, want: same(have, want))
    for key, want in expected.items():
        if key not in found and missing is not None:
            raise FscsError(f"{what}: {missing(key, want)}")
        have = found.get(key)
        if not equal(key, have, want):
            raise FscsError(f"{what}: {mismatch(key, have, want)}")


def recorded(store_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The store attributes recorded in every derived file, as plain Python."""
    keys = DERIVED + ("layers", "normalization", "code_version")
    return {key: plain(store_attrs[key]) for key in keys if key in store_attrs}


def check_derived(path: str | os.PathLike, attrs: Mapping[str, Any], store_attrs: Mapping[str, Any]) -> None:
    """FscsError unless a derived file was made from this store (backbone, grid, heads ...)."""
    check_provenance(
        attrs,
        {key: store_attrs[key] for key in DERIVED if key in store_attrs and key in attrs},
        str(path),
        lambda key, have, want: (
            f"attribute '{key}' = {have!r} differs from the feature store's {want!r}; "
            "rebuild it from this store"
        ),
    )
