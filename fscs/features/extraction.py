"""Extraction of a backbone's features for a list of images into a feature store (batched, resumable; on
CUDA, images are decoded by DataLoader workers)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from tqdm import tqdm

from fscs.core.errors import FscsError
from fscs.core.threads import default_threads
from fscs.data.images import load_rgb, open_image
from fscs.features.backbone import Backbone, preprocess
from fscs.features.store import StoreWriter, iter_batches


class _ImageBatches(torch.utils.data.Dataset):
    """Decoded, preprocessed batches of rows (the DataLoader workers' job on CUDA)."""

    def __init__(self, paths: list[str], batches: list[list[int]], size: int):
        self.paths, self.batches, self.size = paths, batches, size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[list[int], torch.Tensor]:
        rows = self.batches[i]
        return rows, torch.stack([preprocess(load_rgb(self.paths[r]), self.size) for r in rows])


def _batches(backbone: Backbone, paths: list[str], todo: list[list[int]]) -> Any:
    """(rows, preprocessed batch) in order: decoded in this process on the CPU; on CUDA by DataLoader
    workers into pinned memory, so decoding overlaps the GPU."""
    data = _ImageBatches(list(paths), todo, backbone.input_size)
    if backbone.device.type != "cuda":
        return (data[i] for i in range(len(data)))
    workers = max(1, min(8, default_threads() - 1))
    return torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, pin_memory=True)


def check_images(paths: list[str]) -> None:
    """Cheaply check that every image exists and decodes (JPEGs at reduced scale); names the bad file."""
    for path in paths:
        with open_image(path) as im:
            im.draft("RGB", (64, 64))
            im.load()


def extract_to_store(
    backbone: Backbone,
    image_ids: list[str],
    image_paths: list[str],
    out: str | os.PathLike,
    layers: Any = "all",
    batch_size: int = 8,
    progress: bool | None = None,
    on_batch: Any = None,
    check: bool = True,
) -> dict[str, Any]:
    """Extract features of every image into the store at ``out`` (resuming a matching partial write).

    Images are checked first; rows go in fixed batches of ``batch_size`` so a resumed run recomputes
    exactly the batches that were not flushed. ``on_batch(rows_done)`` is called after each flushed batch.
    Returns counts and timings for the stage report.
    """
    if len(image_ids) != len(image_paths):
        raise ValueError("image_ids and image_paths differ in length")
    if batch_size < 1:
        raise FscsError(f"backbone.batch_size must be >= 1, got {batch_size}")
    if check:
        check_images(list(image_paths))
    writer = StoreWriter(out, image_ids, backbone.store_attrs(layers), backbone.store_shapes(layers))
    try:
        done = writer.done
        skipped = int(done.sum())
        todo = [rows for rows in iter_batches(len(image_ids), batch_size) if not done[rows].all()]
        start = time.perf_counter()
        computed = 0
        bar = tqdm(
            total=len(image_ids),
            initial=skipped,
            disable=True if progress is False else None,
            unit="img",
            desc=f"extract {backbone.name}",
        )
        with bar:
            for rows, x in _batches(backbone, image_paths, todo):
                f = backbone.extract(x, layers, dtype=torch.float16).cpu()
                writer.write(rows, f.tokens.numpy(), f.cls_query.numpy(), f.patch_keys.numpy())
                computed += len(rows)
                bar.update(int((~done[rows]).sum()))
                if on_batch is not None:
                    on_batch(int(writer.done.sum()))
        seconds = time.perf_counter() - start
        path = writer.finalize()
    finally:
        writer.close()
    store_bytes = path.stat().st_size
    return {
        "images": len(image_ids),
        "computed": computed,
        "resumed_rows": skipped,
        "seconds": round(seconds, 3),
        "images_per_s": round(computed / seconds, 3) if seconds > 0 and computed else None,
        "store_bytes": store_bytes,
        "bytes_per_image": int(round(store_bytes / max(1, len(image_ids)))),
    }
