"""Extraction of a backbone's features for a list of images into a feature store (batched, resumable; on
CUDA, images are decoded by DataLoader workers). The HDF5 writes run on one writer thread, so they overlap
the next batches' compute."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from fscs.core.errors import FscsError
from fscs.core.threads import default_threads
from fscs.data.images import load_rgb, open_image
from fscs.features.backbone import Backbone, preprocess
from fscs.features.store import StoreWriter, iter_batches

#: computed batches queued for the writer thread: bounds the host memory held to this many batches, plus the
#: one being written and the one being computed
WRITE_AHEAD = 2


class _BackgroundWriter:
    """Writes batches to a `StoreWriter` in order on one thread, fed by a queue of at most ``depth`` batches.

    ``flushed(rows)`` runs on that thread right after a batch is flushed (before the next is written), so it
    sees the store exactly as far as it is written. An error there (the write's or ``flushed``'s) is
    re-raised, as the same exception, in the caller's thread by the next `put` or by `close`."""

    def __init__(
        self, writer: StoreWriter, flushed: Callable[[list[int]], None], depth: int = WRITE_AHEAD
    ) -> None:
        self._writer, self._flushed = writer, flushed
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abandon = False
        self.waited = 0.0  # seconds the caller spent blocked on the writer
        self._thread = threading.Thread(target=self._run, name="fscs-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None or self._abandon:
                continue  # dropped, but still taken off the queue: `put` never blocks for good
            rows, arrays, copied = item
            try:
                if copied is not None:
                    copied.synchronize()  # the device-to-host copies into these buffers are complete
                self._writer.write(rows, *(a.numpy() for a in arrays))
                self._flushed(rows)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, rows: list[int], arrays: tuple[torch.Tensor, ...], copied: Any = None) -> None:
        """Queue one batch (CPU tensors; ``copied``: the CUDA event after which they are filled), blocking
        while ``depth`` batches wait; raises a writer error from an earlier batch."""
        self._raise()
        t0 = time.perf_counter()
        self._queue.put((rows, arrays, copied))
        self.waited += time.perf_counter() - t0
        self._raise()

    def close(self, abandon: bool = False) -> None:
        """Wait until every queued batch is written (``abandon``: dropped, the caller is failing), then
        re-raise a writer error (unless abandoning: the caller's own error goes first)."""
        self._abandon = abandon
        t0 = time.perf_counter()
        self._queue.put(None)
        self._thread.join()
        self.waited += time.perf_counter() - t0
        if not abandon:
            self._raise()


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
    storage: str = "fp16",
) -> dict[str, Any]:
    """Extract features of every image into the store at ``out`` (resuming a matching partial write).

    Images are checked first; rows go in fixed batches of ``batch_size`` so a resumed run recomputes
    exactly the batches that were not flushed. The writes run on a writer thread while the next batches are
    computed (`_BackgroundWriter`); ``on_batch(rows_done)`` is called on that thread after each flushed batch.
    ``storage``: how the rows are held on disk (`fscs.features.store`).
    Returns counts and timings for the stage report (``writer_wait_seconds``: compute blocked on the writer).
    """
    if len(image_ids) != len(image_paths):
        raise ValueError("image_ids and image_paths differ in length")
    if batch_size < 1:
        raise FscsError(f"backbone.batch_size must be >= 1, got {batch_size}")
    if check:
        check_images(list(image_paths))
    writer = StoreWriter(
        out, image_ids, backbone.store_attrs(layers), backbone.store_shapes(layers), storage=storage
    )
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

        def flushed(rows: list[int]) -> None:
            bar.update(int((~done[rows]).sum()))
            if on_batch is not None:
                on_batch(int(writer.done.sum()))

        with bar:
            background = _BackgroundWriter(writer, flushed)
            try:
                for rows, x in _batches(backbone, image_paths, todo):
                    f, copied = backbone.extract(x, layers, dtype=torch.float16).to_host()
                    background.put(rows, (f.tokens, f.cls_query, f.patch_keys), copied)
                    computed += len(rows)
            except BaseException:
                background.close(abandon=True)  # the thread must stop before the writer is closed
                raise
            background.close()
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
        "writer_wait_seconds": round(background.waited, 3),
        "images_per_s": round(computed / seconds, 3) if seconds > 0 and computed else None,
        "store_bytes": store_bytes,
        "bytes_per_image": int(round(store_bytes / max(1, len(image_ids)))),
    }
