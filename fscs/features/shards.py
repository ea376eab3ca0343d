"""Sharded extraction: which index rows a shard extracts, and the join of shard stores into one store.

A shard is the ordinary extraction (`fscs.features.extraction.extract_to_store`) over a contiguous row range
of the index, written to its own complete store. `join_shards` builds the store every later stage opens: a
small HDF5 file whose ``tokens``, ``cls_query``, ``patch_keys``, ``digests`` and ``done`` (and an int8 store's
scales) are h5py virtual datasets mapping each shard's rows in order, with ``image_ids`` copied and the
shards' provenance attributes (``storage`` among them, so the joined store decodes as its shards do). Source
names are relative to the joined file's folder (HDF5 looks there first, whatever the cwd), so the files stay
valid wherever DVC checks them out together. The join records each shard's file, row count and image-id digest
(`fscs.features.store.SHARD_ATTRS`); `fscs.features.store.FeatureStore` checks them on open, since a virtual
dataset reads a missing source as fill values rather than failing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fscs.core.errors import FscsError
from fscs.core.io import atomic_path
from fscs.features.store import SHARD_ATTRS, FeatureStore, ids_digest, stored_datasets

#: Attributes that differ from shard to shard by design; every other attribute must agree.
PER_SHARD = ("image_ids_sha256", "complete")


def shard_rows(n: int, shards: int, shard: int) -> range:
    """Rows [shard * n / shards, (shard + 1) * n / shards) of an n-row index: contiguous, sizes within 1."""
    if not 0 <= shard < shards:
        raise FscsError(f"--shard {shard}: not one of backbone.shards 0..{shards - 1}")
    if shards > n:
        raise FscsError(f"backbone.shards: {shards} shards for {n} images; at most one shard per image")
    return range(shard * n // shards, (shard + 1) * n // shards)


def shard_file(folder: str | os.PathLike, shard: int) -> Path:
    """The store file of shard ``shard`` in the shards folder."""
    return Path(folder) / f"shard-{shard}.h5"


def _check_shared_attrs(stores: Sequence[FeatureStore]) -> None:
    """Every attribute but `PER_SHARD` agrees across shards; FscsError naming the first that differs."""
    first = stores[0]
    shared = {k: v for k, v in first.attrs.items() if k not in PER_SHARD}
    for store in stores[1:]:
        have = {k: v for k, v in store.attrs.items() if k not in PER_SHARD}
        for key in sorted(set(shared) | set(have)):
            if shared.get(key) != have.get(key):
                raise FscsError(
                    f"{store.path}: attribute '{key}' is {have.get(key)!r} but {first.path} has "
                    f"{shared.get(key)!r}; shards of one store must come from one extraction"
                )


def join_shards(
    shards: Sequence[str | os.PathLike], out: str | os.PathLike, image_ids: Sequence[str], expect: dict | None
) -> dict[str, Any]:
    """Join the shard stores (in shard order) into the store at ``out``, checking that they hold exactly
    ``image_ids`` in order (shard i the rows `shard_rows` gives it) and match ``expect`` (as FeatureStore).
    Returns counts and sizes for the stage report."""
    out = Path(out)
    n, count = len(image_ids), len(shards)
    stores: list[FeatureStore] = []
    try:
        for i, path in enumerate(shards):
            stores.append(FeatureStore(path, expect))
            rows = shard_rows(n, count, i)
            if stores[-1].image_ids != list(image_ids[rows.start : rows.stop]):
                raise FscsError(
                    f"{path}: shard {i} of {count} holds other images than rows "
                    f"{rows.start}..{rows.stop - 1} of the index; re-run `dvc repro extract`"
                )
        _check_shared_attrs(stores)
        with atomic_path(out) as tmp:
            _write_joined(tmp, out.parent, stores, list(image_ids))
    finally:
        for store in stores:
            store.close()
    shard_bytes = sum(Path(p).stat().st_size for p in shards)
    return {
        "images": n,
        "shards": count,
        "store_bytes": shard_bytes + out.stat().st_size,
        "bytes_per_image": int(round(shard_bytes / max(1, n))),
    }


def _write_joined(tmp: Path, folder: Path, stores: list[FeatureStore], image_ids: list[str]) -> None:
    """Write the joined file at ``tmp`` (renamed into ``folder`` later): virtual datasets over the shards,
    the first shard's attributes as stored (all shards agree on them) and the shard record."""
    names = [os.path.relpath(s.path, folder) for s in stores]
    with h5py.File(tmp, "w") as f, h5py.File(stores[0].path, "r") as first:
        f.create_dataset("image_ids", data=np.array(image_ids, dtype=object), dtype=h5py.string_dtype())
        virtual = [d for d in stored_datasets(stores[0].storage) if d != "image_ids"]
        shapes = {d: (first[d].shape[1:], first[d].dtype) for d in virtual}
        for name, (shape, dtype) in shapes.items():
            layout = h5py.VirtualLayout(shape=(len(image_ids), *shape), dtype=dtype)
            start = 0
            for store, source in zip(stores, names, strict=True):
                rows = len(store)
                layout[start : start + rows] = h5py.VirtualSource(source, name, shape=(rows, *shape))
                start += rows
            f.create_virtual_dataset(name, layout, fillvalue=np.zeros((), dtype).item())
        for key, value in first.attrs.items():
            if key not in PER_SHARD:
                f.attrs[key] = value
        files, rows, digests = SHARD_ATTRS
        f.attrs.create(files, names, dtype=h5py.string_dtype())
        f.attrs[rows] = np.array([len(s) for s in stores], dtype=np.int64)
        f.attrs.create(digests, [s.attrs["image_ids_sha256"] for s in stores], dtype=h5py.string_dtype())
        f.attrs["image_ids_sha256"] = ids_digest(image_ids)
        f.attrs["complete"] = True
