"""Atomic writes: every output goes to a temporary sibling and is renamed into place only when complete.

Also reproducible checkpoints and the JSON encoding of HDF5 attributes shared by the pseudo-label files."""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fscs.core.errors import FscsError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it.

    The temporary name carries the writer's pid; those of writers no longer running (killed mid-write) are
    removed first. A full disk ends in one FscsError naming `path`, with the temporary file gone."""
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise_if_no_space(exc, final)
        raise
    remove_stale_partials(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError for a failed flush
        raise_if_no_space(exc, final)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


#: Handles whose write failed and that must never be closed: closing crashes h5py (see `abandon`).
_ABANDONED: list[Any] = []


def abandon(handle: Any) -> None:
    """Keep ``handle`` alive and unclosed for the rest of the process. h5py crashes when it closes an HDF5
    file whose write failed, so `stages._common.run_stage` ends such a process without closing it."""
    _ABANDONED.append(handle)


def has_abandoned() -> bool:
    """Whether this process holds a handle that must not be closed (its exit must skip the cleanup)."""
    return bool(_ABANDONED)


@contextmanager
def h5_errors_raised() -> Iterator[None]:
    """Raise, after the block, the first error h5py reported only as an ignored warning: it does so for a
    write that fails while it frees an object, which would otherwise lose data silently."""
    caught: list[BaseException] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: caught.append(unraisable.exc_value)
    try:
        yield
    finally:
        sys.unraisablehook = previous
    if caught:
        raise caught[0]


def remove_stale_partials(final: Path) -> list[Path]:
    """Delete `atomic_path`'s temporary files for ``final`` whose writer process has exited; return them."""
    removed = []
    prefix, suffix = f".{final.name}.", ".partial"
    for p in final.parent.glob(f"{glob.escape(prefix)}*{suffix}"):
        pid = p.name[len(prefix) : -len(suffix)]
        if pid.isdigit() and not _running(int(pid)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a pid owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a full disk or quota: an OSError with ENOSPC / EDQUOT, or one of
    HDF5's write errors, which h5py raises without an errno but with the C library's message."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (
            exc.errno in _NO_SPACE or any(f"errno = {e}," in str(exc) for e in _NO_SPACE)
        ):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space_error(path: str | os.PathLike, need: int | None = None) -> FscsError:
    """The one-line refusal for a full disk at ``path`` (``need``: bytes the output would take, if known)."""
    where = Path(path)
    probe = next((p for p in (where, *where.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    wanted = f"; it needs about {need / 1e6:,.1f} MB" if need else ""
    return FscsError(
        f"{where}: no space left on device ({free / 1e6:,.1f} MB free there{wanted}); free space and re-run"
    )


def raise_if_no_space(exc: BaseException, path: str | os.PathLike, need: int | None = None) -> None:
    """Raise `no_space_error` from ``exc`` when it is a full disk; otherwise return (the caller re-raises)."""
    if is_no_space(exc):
        raise no_space_error(path, need) from None


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` atomically and reproducibly: serialised in memory first, because the zip
    archive's inner folder is named after the file written, and a temporary name would change its md5."""
    import torch  # here, not at the top: most readers of this module never load torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_torch(path: str | os.PathLike, what: str) -> Any:
    """`torch.load` of tensors and plain values only (``weights_only=True``), any failure one FscsError line
    naming ``path``. A file holding other Python objects is refused and never unpickled: such objects can
    run code, and fscs writes none."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the file's fault
        text = str(exc).strip()
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in text:
            raise FscsError(
                f"{path}: holds Python objects other than tensors and plain values, which fscs does not "
                f"load (unpickling them could run code); a {what} written by fscs holds none"
            ) from None
        # torch's own text advises turning the protection off: only its finding is kept
        detail = text.partition("WeightsUnpickler error:")[2].strip() or text
        first = detail.splitlines()[0].strip() if detail else type(exc).__name__
        raise FscsError(f"{path}: not a readable {what} ({first})") from None


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
