"""The HDF5 feature store: per-image backbone tokens and last-block attention q/k, float16 when read.

Layout (row r = one image, one image per HDF5 chunk so a read touches only that image):

- ``image_ids`` (N,) str
- ``tokens`` (N, L, 1+P, D) float16: output of each selected block after the final LayerNorm,
  CLS first, then the P = gh*gw patch tokens row-major (register tokens, if any, dropped)
- ``cls_query`` (N, H, d) float16 and ``patch_keys`` (N, H, P, d) float16 of the last block's attention
- ``digests`` (N, 3) uint32: each row's CRC-32 of ``tokens``, ``cls_query`` and ``patch_keys`` (`row_digest`)
- ``done`` (N,) bool: row r has been written

Storage (attribute ``storage``, params ``backbone.storage``; absent in stores written before it: ``fp16``)
sets how ``tokens``, ``cls_query`` and ``patch_keys`` are held on disk; reads return float16 whatever it is:

- ``fp16``: float16, as above.
- ``bf16``: the raw uint16 bits of bfloat16 (h5py has no bfloat16), rounded to nearest even from the written
  values: relative error at most 2^-8, the bytes of fp16 (a smaller store only where fp16 would not do).
- ``int8``: int8 codes round(x / s) in [-127, 127] with a symmetric scale s per vector over the last axis
  (per token, per head's query, per head and patch key) in ``<name>_scale`` (float16, rounded up so no code
  clips): absolute error at most s / 2, about half the bytes of fp16.

Attributes: ``backbone``, ``arch``, ``weights_sha256``, ``source``, ``input_size``, ``patch_size``,
``grid`` [gh, gw], ``layers`` (resolved block indices), ``depth``, ``num_heads``, ``embed_dim``,
``normalization``, ``code_version``, ``fused`` (which CPU path computed it, see fscs.features.backbone),
``precision`` (``fp32`` | ``bf16``), ``storage`` (above), ``device`` (where it was computed; recorded, never
compared) and ``complete`` (True only after the last write) and ``image_ids_sha256``.

Integrity: every row of ``tokens``, ``cls_query``, ``patch_keys`` (their scales, ``digests``, ``done``)
carries HDF5's Fletcher32 checksum, verified by HDF5 on each read. Fletcher32 accepts a chunk zeroed together
with its checksum (the checksum of zeros is zero), so each row also has a CRC-32 of the bytes stored for it
(codes, then scales) seeded with the dataset name and image id, written with the row and compared on every
read: zeros never match it, nor does another image's row. A damaged row is refused with the file, the
dataset and the rows named. ``image_ids`` (variable-length strings, which HDF5 cannot filter) is checked
against its SHA-256 on open.
`FeatureStore` compares ``backbone``, ``arch``,
``input_size``, ``layers`` ("all" means every block of ``depth``), ``normalization``, ``code_version``,
``precision`` (absent in stores written before it: those are ``fp32``) and ``storage`` with what the params
ask for (`expected_attrs`), plus any other key given in ``expect``.

Writing goes to ``<path>.partial``; rows are flushed batch by batch with their ``done`` flags, and only when
every row is done is ``complete`` set and the file renamed to ``<path>``. A re-run after a crash resumes the
partial file when it opens and was started for the same attributes and image list; otherwise it rebuilds.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import h5py
import numpy as np

from fscs.core.errors import FscsError
from fscs.core.io import abandon, h5_errors_raised, is_no_space, no_space_error, raise_if_no_space
from fscs.core.provenance import check_provenance
from fscs.features.names import resolve_arch

if TYPE_CHECKING:  # pydantic: kept out of the import of this module (GPU smoke)
    from fscs.config.params import BackboneConfig

#: Bump when the layout of the store or the meaning of its contents changes (3: per-row CRC-32 digests).
STORE_VERSION = 3

#: Per-image datasets whose rows carry a CRC-32 in ``digests`` (its columns, in this order).
DIGESTED = ("tokens", "cls_query", "patch_keys")

#: Datasets written with HDF5's Fletcher32 filter: a checksum per chunk (per image row), verified on read.
CHECKSUMMED = (*DIGESTED, "digests", "done")

#: How images become tokens; recorded in the store so a change of recipe invalidates it.
NORMALIZATION = (
    "resize SxS bilinear antialias (no aspect preservation); ImageNet mean/std; "
    "block outputs through the final LayerNorm; registers dropped"
)

DATASETS = ("image_ids", "tokens", "cls_query", "patch_keys", "digests", "done")

#: How `DIGESTED` datasets are held on disk (params ``backbone.storage``), with the dtype of their codes.
STORAGES = {"fp16": np.float16, "bf16": np.uint16, "int8": np.int8}

#: Name of the per-vector scale dataset beside each `DIGESTED` dataset of an ``int8`` store.
SCALES = {name: f"{name}_scale" for name in DIGESTED}

# Attributes compared between a store and what the params ask for, in this order.
_COMPARED = (
    "backbone",
    "arch",
    "input_size",
    "layers",
    "normalization",
    "code_version",
    "precision",
    "storage",
)

# Compared attributes that stores written before them lack, with the value those stores have.
_BEFORE = {"precision": "fp32", "storage": "fp16"}


def storage_of(attrs: dict[str, Any], where: str) -> str:
    """The ``storage`` attribute of a store (``fp16`` when absent), refused when this code cannot read it."""
    storage = attrs.get("storage", _BEFORE["storage"])
    if storage not in STORAGES:
        raise FscsError(
            f"{where}: unknown storage {storage!r} (this fscs reads {list(STORAGES)}); "
            "re-run `dvc repro extract`"
        )
    return storage


def stored_datasets(storage: str) -> tuple[str, ...]:
    """Every dataset a store of ``storage`` holds: `DATASETS`, plus the scales of an ``int8`` store."""
    return DATASETS + (tuple(SCALES.values()) if storage == "int8" else ())


def checksummed(storage: str) -> tuple[str, ...]:
    """The datasets of a store of ``storage`` written with Fletcher32: `CHECKSUMMED`, plus int8's scales."""
    return CHECKSUMMED + (tuple(SCALES.values()) if storage == "int8" else ())


def parts(name: str, storage: str) -> tuple[str, ...]:
    """The datasets holding `DIGESTED` dataset ``name`` in a store of ``storage``: its codes (and scale)."""
    return (name, SCALES[name]) if storage == "int8" else (name,)


def encode(storage: str, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """Values -> the arrays stored for them (`parts` order): float16; bfloat16 bits (round to nearest even);
    int8 codes and their float16 scale per vector over the last axis."""
    if storage == "fp16":
        return (np.ascontiguousarray(x, dtype=np.float16),)
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if storage == "bf16":
        u = x32.view(np.uint32)
        bits = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        return (np.where(np.isnan(x32), np.uint16(0x7FC0), bits),)
    want = np.abs(x32).max(axis=-1) / np.float32(127)
    scale = want.astype(np.float16)
    scale = np.where(scale.astype(np.float32) < want, np.nextafter(scale, np.float16(np.inf)), scale)
    div = np.where(scale > 0, scale, np.float16(1)).astype(np.float32)[..., None]
    codes = np.clip(np.rint(x32 / div), -127, 127).astype(np.int8)
    return codes, scale


def decode(storage: str, stored: Sequence[np.ndarray]) -> np.ndarray:
    """The arrays `encode` stored -> float16 values (same shape as the codes)."""
    if storage == "fp16":
        return stored[0]
    if storage == "bf16":
        return (stored[0].astype(np.uint32) << 16).view(np.float32).astype(np.float16)
    codes, scale = stored
    return (codes.astype(np.float32) * scale.astype(np.float32)[..., None]).astype(np.float16)


def row_bytes(shapes: dict[str, tuple[int, ...]], storage: str = "fp16") -> int:
    """Bytes one image row takes on disk: the stored data of `DIGESTED` datasets (int8: and their float16
    scales, one per vector over the last axis), their digests, the done flag and the rows' chunk checksums."""
    width = np.dtype(STORAGES[storage]).itemsize
    data = sum(width * int(np.prod(shapes[name])) for name in DIGESTED)
    if storage == "int8":
        data += sum(2 * int(np.prod(shapes[name][:-1])) for name in DIGESTED)
    chunks = sum(len(parts(name, storage)) for name in DIGESTED)
    return data + 4 * len(DIGESTED) + 1 + 4 * chunks


def _plain(value: Any) -> Any:
    """HDF5 attribute value -> plain Python (str, int, bool, list)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def resolve_layers(layers: Any, depth: int) -> list[int]:
    """Params' ``layers`` ("all" or a list of block indices, negatives from the end) -> sorted indices."""
    if layers is None or layers == "all":
        return list(range(depth))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list | tuple) or not layers:
        raise FscsError(
            f"backbone.layers: expected 'all' or a non-empty list of block indices, got {layers!r}"
        )
    out = set()
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not -depth <= i < depth:
            raise FscsError(f"backbone.layers: {i!r} is not a block index of a {depth}-block backbone")
        out.add(i % depth)
    return sorted(out)


def expected_attrs(bb: BackboneConfig) -> dict[str, Any]:
    """The ``expect`` dict for `FeatureStore` from params.yaml's validated ``backbone`` section."""
    return {
        "backbone": bb.name,
        "arch": resolve_arch(bb.name, bb.arch),
        "input_size": bb.input_size,
        "layers": bb.layers,
        "normalization": NORMALIZATION,
        "code_version": STORE_VERSION,
        "precision": bb.precision,
        "storage": bb.storage,
    }


def _matches(key: str, have: Any, want: Any, attrs: dict[str, Any]) -> bool:
    if key == "layers" and (want is None or want == "all" or isinstance(want, int | list | tuple)):
        depth = attrs.get("depth")
        if depth is None:
            return False
        try:
            return list(have) == resolve_layers(want, int(depth))
        except FscsError:
            return False
    if isinstance(want, list | tuple):
        return list(have) == list(want) if isinstance(have, list) else False
    return have == want


def check_attrs(attrs: dict[str, Any], expect: dict[str, Any], where: str) -> None:
    """Raise FscsError naming the first attribute of ``attrs`` that differs from ``expect``."""
    order = [k for k in _COMPARED if k in expect] + [k for k in expect if k not in _COMPARED]
    check_provenance(
        {**_BEFORE, **attrs},  # a store older than a key holds its old meaning
        {key: expect[key] for key in order},
        where,
        lambda key, have, want: (
            f"attribute '{key}' is {have!r} in the store but the params ask for {want!r}; "
            "re-run `dvc repro extract`"
        ),
        missing=lambda key, want: (
            f"attribute '{key}' is missing (expected {want!r}); re-run `dvc repro extract`"
        ),
        equal=lambda key, have, want: _matches(key, have, want, attrs),
    )


class StoreMetadata:
    """What a store's attributes say (grid, heads, width, stored blocks) and its image count, shared by the
    HDF5 store and the online one (`fscs.features.online.OnlineStore`); both set `attrs` and `image_ids`."""

    attrs: dict[str, Any]
    image_ids: list[str]

    @property
    def grid(self) -> tuple[int, int]:
        gh, gw = self.attrs["grid"]
        return int(gh), int(gw)

    @property
    def num_heads(self) -> int:
        return int(self.attrs["num_heads"])

    @property
    def embed_dim(self) -> int:
        return int(self.attrs["embed_dim"])

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.attrs["layers"]]

    def __len__(self) -> int:
        return len(self.image_ids)


class FeatureStore(StoreMetadata):
    """Read-only access to a complete feature store, row by image id, without loading the file."""

    def __init__(self, path: str | os.PathLike, expect: dict[str, Any] | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            partial = partial_path(self.path)
            hint = f" (an unfinished {partial.name} exists)" if partial.exists() else ""
            raise FscsError(f"{self.path}: feature store not found{hint}; run `dvc repro extract`")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise FscsError(f"{self.path}: not a readable HDF5 feature store ({exc})") from exc
        try:
            self.attrs = {k: _plain(v) for k, v in self._f.attrs.items()}
            if not self.attrs.get("complete", False):
                raise FscsError(f"{self.path}: feature store is incomplete; re-run `dvc repro extract`")
            self.storage = storage_of(self.attrs, str(self.path))
            missing = [d for d in stored_datasets(self.storage) if d not in self._f]
            if missing:
                raise FscsError(
                    f"{self.path}: feature store lacks datasets {missing}; re-run `dvc repro extract`"
                )
            sharded = self._f["tokens"].is_virtual  # joined from shard files (fscs.features.shards)
            if sharded:
                check_shards(self.path, self.attrs)  # their checksums, rows and completeness
            unchecked = [d for d in checksummed(self.storage) if not (sharded or self._f[d].fletcher32)]
            if unchecked:
                raise FscsError(
                    f"{self.path}: feature store written without checksums ({', '.join(unchecked)}; an older "
                    "fscs); re-run `dvc repro extract`"
                )
            if expect:
                check_attrs(self.attrs, expect, str(self.path))
            self.image_ids: list[str] = [_plain(s) for s in self._f["image_ids"][:]]
            if ids_digest(self.image_ids) != self.attrs.get("image_ids_sha256"):
                raise FscsError(
                    f"{self.path}: the image_ids dataset does not match its checksum (the file is damaged); "
                    "re-run `dvc repro extract`"
                )
            if not bool(np.all(self._read("done", slice(None)))):
                raise FscsError(f"{self.path}: feature store has unwritten rows; re-run `dvc repro extract`")
            self._digests = self._read("digests", slice(None))  # (N, 3) uint32, a few bytes per image
            self._row = {iid: r for r, iid in enumerate(self.image_ids)}
        except BaseException:
            self._f.close()
            raise

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row

    def row(self, image_id: str) -> int:
        try:
            return self._row[image_id]
        except KeyError:
            raise FscsError(f"{self.path}: image id {image_id!r} is not in the feature store") from None

    # ---- per-image reads -----------------------------------------------------------------------------
    def _read(self, name: str, rows: int | slice) -> np.ndarray:
        """``name[rows]`` (`DIGESTED` datasets decoded to float16), refusing a row that fails its Fletcher32
        checksum or (for `DIGESTED` datasets) its CRC-32, naming the file, the dataset and every damaged row
        (found by reading the dataset once, on this error path only)."""
        stored = parts(name, self.storage) if name in DIGESTED else (name,)
        try:
            data = [self._f[d][rows] for d in stored]
        except OSError as exc:
            self._refuse_damaged(name, [] if isinstance(rows, slice) else [rows], str(exc))
        if name not in DIGESTED:
            return data[0]
        first = (rows.start or 0) if isinstance(rows, slice) else rows
        blocks = data if isinstance(rows, slice) else [d[None] for d in data]
        if any(not self._digest_ok(name, first + i, row) for i, row in enumerate(zip(*blocks, strict=True))):
            self._refuse_damaged(name, [], "CRC-32 mismatch")
        return decode(self.storage, data)

    def _digest_ok(self, name: str, row: int, stored: Sequence[np.ndarray]) -> bool:
        want = int(self._digests[row, DIGESTED.index(name)])
        return row_digest(name, self.image_ids[row], *stored) == want

    def _refuse_damaged(self, name: str, fallback: list[int], why: str) -> NoReturn:
        bad = self.damaged_rows(name) or fallback
        listed = ", ".join(f"{r} ({self.image_ids[r]!r})" for r in bad[:10]) if bad else "unknown"
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise FscsError(
            f"{self.path}: dataset '{name}' is damaged: rows {listed}{more} fail their checksum "
            f"({why}); re-run `dvc repro extract`"
        ) from None

    def damaged_rows(self, name: str) -> list[int]:
        """The rows of dataset ``name`` failing their Fletcher32 checksum or CRC-32 (reads each row once; an
        int8 store's codes and scales together)."""
        stored = parts(name, self.storage) if name in DIGESTED else (name,)
        bad = []
        for r in range(self._f[name].shape[0]):
            try:
                data = [self._f[d][r] for d in stored]
            except OSError:
                bad.append(r)
                continue
            if name in DIGESTED and not self._digest_ok(name, r, data):
                bad.append(r)
        return bad

    def tokens(self, image_id: str) -> np.ndarray:
        """(L, 1+P, D) float16: selected blocks' normed outputs, CLS first."""
        return self._read("tokens", self.row(image_id))

    def cls_tokens(self, image_id: str) -> np.ndarray:
        """(L, D) float16: the CLS token of each selected block."""
        return self.tokens(image_id)[:, 0]  # the whole row, so that its CRC-32 is checked

    def cls_query(self, image_id: str) -> np.ndarray:
        """(H, d) float16: the last block's CLS query."""
        return self._read("cls_query", self.row(image_id))

    def patch_keys(self, image_id: str) -> np.ndarray:
        """(H, P, d) float16: the last block's patch keys."""
        return self._read("patch_keys", self.row(image_id))

    def read_all(self, name: str) -> np.ndarray:
        """A whole dataset in memory (e.g. 'cls_query'); mind the size of 'tokens'."""
        if name not in DATASETS:
            raise FscsError(f"{self.path}: no dataset {name!r} (have {list(DATASETS)})")
        if name == "image_ids":
            return self._f[name][:]
        if name == "digests":
            return self._digests.copy()
        return self._read(name, slice(None))

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Attributes a joined store records per shard, in shard order (written by fscs.features.shards.join_shards).
SHARD_ATTRS = ("shard_files", "shard_rows", "shard_ids_sha256")


def check_shards(path: Path, attrs: dict[str, Any]) -> None:
    """Refuse a joined store whose shard files are not all there, complete and the ones it was joined from.

    A virtual dataset reads a missing source as fill values, not an error, so each shard is checked here:
    present beside the store (relative names resolve against the store's folder, whatever the cwd),
    readable, ``complete``, written with checksums, holding the rows and image-id digest the join recorded.
    """
    if os.environ.get("HDF5_VDS_PREFIX"):
        raise FscsError(
            f"{path}: HDF5_VDS_PREFIX is set ({os.environ['HDF5_VDS_PREFIX']}), so HDF5 would read the shard "
            "files from there instead of beside the store; unset it"
        )
    files, rows, digests = (attrs.get(k) for k in SHARD_ATTRS)
    if not (isinstance(files, list) and isinstance(rows, list) and isinstance(digests, list)) or not (
        len(files) == len(rows) == len(digests) > 0
    ):
        raise FscsError(f"{path}: sharded feature store lacks its shard record; re-run `dvc repro extract`")
    for name, n, digest in zip(files, rows, digests, strict=True):
        shard = path.parent / name
        fix = f"; re-run `dvc repro extract` (shard of {n} rows of {path})"
        if not shard.is_file():
            raise FscsError(f"{shard}: shard file is missing{fix}")
        try:
            with h5py.File(shard, "r") as f:
                have = {k: _plain(v) for k, v in f.attrs.items()}
                storage = storage_of(have, str(shard))
                lengths = {d: f[d].shape[0] for d in stored_datasets(storage) if d in f}
                unchecked = [d for d in checksummed(storage) if d not in f or not f[d].fletcher32]
        except OSError as exc:
            raise FscsError(f"{shard}: shard is not a readable HDF5 file ({exc}){fix}") from None
        if not have.get("complete", False):
            raise FscsError(f"{shard}: shard is incomplete{fix}")
        if storage != storage_of(attrs, str(path)):
            raise FscsError(f"{shard}: shard's storage {storage!r} is not the joined store's{fix}")
        if unchecked:
            raise FscsError(f"{shard}: shard lacks checksummed datasets {unchecked}{fix}")
        if set(lengths) != set(stored_datasets(storage)) or set(lengths.values()) != {n}:
            raise FscsError(f"{shard}: shard holds {lengths} rows, the join recorded {n}{fix}")
        if have.get("image_ids_sha256") != digest:
            raise FscsError(f"{shard}: shard holds other images than the join recorded{fix}")


def partial_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".partial")


class StoreWriter:
    """Writes a store to ``<path>.partial`` batch by batch; `finalize` marks it complete and renames it.

    ``attrs`` must hold every provenance attribute (see module doc) except ``complete`` and ``storage``;
    ``shapes`` gives the per-image shapes of ``tokens`` (L, 1+P, D), ``cls_query`` (H, d) and ``patch_keys``
    (H, P, d); ``storage`` (one of `STORAGES`, recorded as the ``storage`` attribute) how they are stored.
    If a partial file for the same attributes and image list exists and opens, it is resumed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_ids: Sequence[str],
        attrs: dict[str, Any],
        shapes: dict[str, tuple[int, ...]],
        storage: str = "fp16",
    ):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.image_ids = [str(i) for i in image_ids]
        if len(set(self.image_ids)) != len(self.image_ids):
            raise FscsError(f"{self.path}: duplicate image ids in the image list")
        if storage not in STORAGES:
            raise FscsError(f"{self.path}: backbone.storage must be one of {list(STORAGES)}, got {storage!r}")
        if attrs.get("storage", storage) != storage:
            raise FscsError(
                f"{self.path}: attrs say storage {attrs['storage']!r}, the writer was given {storage!r}"
            )
        self.storage = storage
        self.attrs = {**attrs, "storage": storage}
        self.attrs.pop("complete", None)
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self.resumed = False
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self._try_resume()
        if self._f is None:
            try:
                self._f = self._create()
            except (OSError, RuntimeError) as exc:
                self.partial.unlink(missing_ok=True)
                raise_if_no_space(exc, self.path)
                raise
        self._done = self._f["done"][:].astype(bool)
        self._f.close()
        self._reserve_space()  # with the file closed: HDF5 must see the reserved size when it opens it
        self._f = h5py.File(self.partial, "r+")
        # held open: h5py reports a failed write of a dataset it closes only as an ignored warning
        self._ds = {name: self._f[name] for name in checksummed(self.storage)}

    def row_bytes(self) -> int:
        """Bytes one image row takes on disk (`row_bytes` of this store's shapes and storage)."""
        return row_bytes(self.shapes, self.storage)

    def _bytes_for(self, rows: int) -> int:
        """Disk ``rows`` rows take, with 2% + 256 bytes a row + 64 KiB for HDF5's chunk index."""
        return int(rows * self.row_bytes() * 1.02) + 256 * rows + (64 << 10)

    def bytes_needed(self) -> int:
        """Disk the rows still to write will take."""
        return self._bytes_for(int((~self._done).sum()))

    def _reserve_space(self) -> None:
        """Allocate the whole store's disk space before any row is computed (`os.posix_fallocate`), so a full
        disk is met here, as one clear error, and never inside an HDF5 write: h5py cannot close a file whose
        write failed without crashing the process. HDF5 trims the file to its data when it closes it (the
        reserved size must be there when HDF5 opens the file, so this runs on the closed file)."""
        if self._allocate(self._bytes_for(len(self.image_ids))):  # the rows written hold theirs already
            return
        need = self.bytes_needed()
        free = shutil.disk_usage(self.partial.parent).free
        if self.resumed:
            size = self.partial.stat().st_size / 1e6
            raise FscsError(
                f"{self.path}: no space left on device for the {int((~self._done).sum())} rows still to "
                f"write (needs about {need / 1e6:,.1f} MB, {free / 1e6:,.1f} MB free; the resumable "
                f"{self.partial.name} ({size:,.1f} MB) is kept: free space and re-run, or delete it)"
            )
        self.partial.unlink(missing_ok=True)
        raise no_space_error(self.path, need)

    def _allocate(self, size: int) -> bool:
        """Whether the partial file now has ``size`` bytes allocated; where the file system cannot preallocate
        (macOS, some network file systems), whether the free space holds what is missing of them."""
        if hasattr(os, "posix_fallocate"):
            try:
                fd = os.open(self.partial, os.O_WRONLY)
                try:
                    os.posix_fallocate(fd, 0, size)
                finally:
                    os.close(fd)
                return True
            except OSError as exc:
                if is_no_space(exc):
                    return False
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        missing = size - self.partial.stat().st_size
        return shutil.disk_usage(self.partial.parent).free >= missing

    def _abort_if_no_space(self, exc: BaseException) -> None:
        """After a failed write: on a full disk drop the partial file (a failed HDF5 write may leave it
        inconsistent; removing it frees the disk for the re-run) and raise the one-line refusal."""
        if not is_no_space(exc):
            return
        need = self.bytes_needed()
        # h5py crashes the process when it closes a file whose write failed: the handle is abandoned, never
        # closed, and the file unlinked, which frees its space
        abandon((self._f, dict(self._ds)))
        self._closed = True
        self.partial.unlink(missing_ok=True)
        raise no_space_error(self.path, need) from None

    # ---- opening -------------------------------------------------------------------------------------
    def _try_resume(self) -> h5py.File | None:
        if not self.partial.exists():
            return None
        try:
            f = h5py.File(self.partial, "r+")
        except OSError:
            return None  # killed mid-write beyond repair: rebuild
        try:
            have = {k: _plain(v) for k, v in f.attrs.items()}
            ok = all(k in have and _plain(have[k]) == _plain(_to_attr(v)) for k, v in self.attrs.items())
            ok = ok and all(d in f for d in stored_datasets(self.storage)) and not have.get("complete", False)
            ok = ok and [_plain(s) for s in f["image_ids"][:]] == self.image_ids
            ok = ok and f["done"][:].shape == (len(self.image_ids),)  # reading verifies its checksum
            n = len(self.image_ids)
            for name, shape in self.shapes.items():
                ok = ok and f[name].shape == (n, *shape)
            if ok:
                self.resumed = True
                return f
        except Exception:  # noqa: BLE001 - any damage means rebuild
            pass
        f.close()
        return None

    def _create(self) -> h5py.File:
        if self.partial.exists():
            self.partial.unlink()
        n = len(self.image_ids)
        f = h5py.File(self.partial, "w")
        try:
            f.create_dataset(
                "image_ids", data=np.array(self.image_ids, dtype=object), dtype=h5py.string_dtype()
            )
            for name in DIGESTED:
                shape = self.shapes[name]
                f.create_dataset(
                    name, shape=(n, *shape), dtype=STORAGES[self.storage], chunks=(1, *shape), fletcher32=True
                )
                if self.storage == "int8":
                    per = shape[:-1]
                    f.create_dataset(
                        SCALES[name], shape=(n, *per), dtype=np.float16, chunks=(1, *per), fletcher32=True
                    )
            f.create_dataset("digests", shape=(n, len(DIGESTED)), dtype=np.uint32, fletcher32=True)
            f.create_dataset("done", shape=(n,), dtype=bool, fillvalue=False, fletcher32=True)
            for k, v in self.attrs.items():
                f.attrs[k] = _to_attr(v)
            f.attrs["image_ids_sha256"] = ids_digest(self.image_ids)
            f.attrs["complete"] = False
            f.flush()
        except BaseException:
            f.close()
            raise
        return f

    # ---- writing -------------------------------------------------------------------------------------
    @property
    def done(self) -> np.ndarray:
        """(N,) bool copy of which rows are written."""
        return self._done.copy()

    def write(
        self, rows: Sequence[int], tokens: np.ndarray, cls_query: np.ndarray, patch_keys: np.ndarray
    ) -> None:
        """Write rows (ascending or not) in this store's storage and mark them done; flushed to disk before
        returning."""
        rows = [int(r) for r in rows]
        try:
            with h5_errors_raised():
                for i, r in enumerate(rows):
                    digests = []
                    for name, batch in zip(DIGESTED, (tokens, cls_query, patch_keys), strict=True):
                        stored = encode(self.storage, batch[i])
                        for part, data in zip(parts(name, self.storage), stored, strict=True):
                            self._ds[part][r] = data
                        digests.append(row_digest(name, self.image_ids[r], *stored))
                    self._ds["digests"][r] = np.asarray(digests, dtype=np.uint32)
                self._f.flush()  # data before done flags: a done row always has its data on disk
                for r in rows:
                    self._ds["done"][r] = True
                self._f.flush()
        except (OSError, RuntimeError) as exc:
            self._abort_if_no_space(exc)
            raise
        self._done[rows] = True

    def finalize(self) -> Path:
        """Mark complete and rename to the final path; every row must be done."""
        missing = np.flatnonzero(~self._done)
        if missing.size:
            raise FscsError(
                f"{self.partial}: {missing.size} rows not written (first: {self.image_ids[missing[0]]!r})"
            )
        try:
            with h5_errors_raised():
                self._f.attrs["complete"] = True
                self._f.flush()
                self._ds.clear()
                self._f.close()
        except (OSError, RuntimeError) as exc:
            self._abort_if_no_space(exc)
            raise
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without finalizing (the partial file stays for a resume)."""
        self._ds.clear()
        if not self._closed and self._f.id.valid:
            self._f.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_attr(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return np.asarray(v)
    return v


def row_digest(name: str, image_id: str, *stored: np.ndarray) -> int:
    """CRC-32 of the bytes stored for one image's row of dataset ``name`` (its codes, then any scales),
    seeded with the dataset and the image id: an all-zero row (or digest) never matches, and neither does
    another dataset's or image's row."""
    crc = zlib.crc32(f"{name}\0{image_id}".encode())
    for data in stored:
        crc = zlib.crc32(np.ascontiguousarray(data).view(np.uint8).data, crc)
    return crc


def ids_digest(image_ids: Sequence[str]) -> str:
    """SHA-256 of the image id list (one id a line), recorded in the store and checked on open."""
    return hashlib.sha256("".join(f"{i}\n" for i in image_ids).encode()).hexdigest()


def iter_batches(n: int, batch_size: int) -> Iterator[list[int]]:
    """Fixed row batches [0, b), [b, 2b), ...: the same boundaries on a resume, so results are identical."""
    for start in range(0, n, batch_size):
        yield list(range(start, min(start + batch_size, n)))
