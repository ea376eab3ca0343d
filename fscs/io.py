"""Atomic writes: every output goes to a temporary sibling and is renamed into place only when complete.

Also reproducible checkpoints and the JSON encoding of HDF5 attributes shared by the pseudo-label files."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` atomically and reproducibly: serialised in memory first, because the zip
    archive's inner folder is named after the file written, and a temporary name would change its md5."""
    import torch  # here, not at the top: most readers of this module never load torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def json_attr(value: Any) -> Any:
    """An HDF5-storable attribute value (None and nested structures as JSON text)."""
    if value is None or isinstance(value, dict) or (isinstance(value, list | tuple) and not _flat(value)):
        return json.dumps(value)
    return value


def _flat(seq) -> bool:
    return len(seq) > 0 and all(isinstance(v, int | float | str | np.integer | np.floating) for v in seq)
