"""Benchmark the feature store's integrity checks: write and read throughput with and without them.

    python -m benchmarks.store_checksum [--images 64] [--repeat 3] [--dir DIR] [--store data/features/msrc.h5]

Rows have the layout of the default run's store (DINOv2 ViT-S/14 at 224 px: 12 blocks x 257 tokens x 384
float16 per image, last-block q/k of 6 heads x 64; one chunk per image) filled with random float16 (the
checksum's cost does not depend on the values). Writes go through `fscs.features.store.StoreWriter` in
batches of 8 (Fletcher32 per chunk, a CRC-32 per row, the space reserved up front) or the same layout with
plain h5py, with and without the filter; reads go row by row through `fscs.features.store.FeatureStore` (which
verifies both) or plain h5py. The variants run interleaved in one process and keep their best round. Reads
come from the page cache, so they show the CPU cost the checks add; the extraction rate in
reports/extract.json puts the write cost in proportion. ``--store`` also reads a real store row by row both
ways (e.g. the default run's).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from fscs.features.store import FeatureStore, StoreWriter, iter_batches

SHAPES = {"tokens": (12, 257, 384), "cls_query": (6, 64), "patch_keys": (6, 256, 64)}
ATTRS = {
    "backbone": "benchmark",
    "grid": [16, 16],
    "num_heads": 6,
    "embed_dim": 384,
    "layers": list(range(12)),
}


def rows(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal((n, *s), dtype=np.float32).astype(np.float16) for k, s in SHAPES.items()}


def write_checked(path: Path, data: dict[str, np.ndarray], batch: int) -> float:
    n = len(data["tokens"])
    t0 = time.perf_counter()
    writer = StoreWriter(path, [f"im{i}" for i in range(n)], ATTRS, SHAPES)
    for b in iter_batches(n, batch):
        writer.write(b, data["tokens"][b], data["cls_query"][b], data["patch_keys"][b])
    writer.finalize()
    return time.perf_counter() - t0


def write_h5py(path: Path, data: dict[str, np.ndarray], batch: int, fletcher32: bool) -> float:
    """The store layout written with plain h5py, with or without the filter: the filter's cost alone."""
    n = len(data["tokens"])
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        sets = {
            k: f.create_dataset(k, shape=(n, *s), dtype=np.float16, chunks=(1, *s), fletcher32=fletcher32)
            for k, s in SHAPES.items()
        }
        done = f.create_dataset("done", shape=(n,), dtype=bool, fillvalue=False, fletcher32=fletcher32)
        for b in iter_batches(n, batch):
            for r in b:
                for k, d in sets.items():
                    d[r] = data[k][r]
            f.flush()
            done[b[0] : b[-1] + 1] = True
            f.flush()
    return time.perf_counter() - t0


def read_checked(path: Path) -> float:
    with FeatureStore(path) as store:
        t0 = time.perf_counter()
        for i in store.image_ids:
            store.tokens(i), store.cls_query(i), store.patch_keys(i)
        return time.perf_counter() - t0


def read_h5py(path: Path) -> float:
    with h5py.File(path, "r") as f:
        t0 = time.perf_counter()
        for r in range(f["tokens"].shape[0]):
            f["tokens"][r], f["cls_query"][r], f["patch_keys"][r]
        return time.perf_counter() - t0


def real_store(path: Path, repeat: int) -> None:
    """Row-by-row reads of a real store through FeatureStore (both checks) and plain h5py (best round)."""
    with h5py.File(path, "r") as f:
        n = f["tokens"].shape[0]
        mb = sum(f[k].dtype.itemsize * np.prod(f[k].shape) for k in SHAPES) / 1e6
    read_h5py(path), read_checked(path)  # into the page cache
    plain = min(read_h5py(path) for _ in range(repeat))
    checked = min(read_checked(path) for _ in range(repeat))
    print(f"{path}: {n} images, {mb / n:.2f} MB/image, best of {repeat}")
    for name, seconds in (("read h5py", plain), ("read FeatureStore (Fletcher32 + CRC-32)", checked)):
        print(
            f"{name:40s} {mb / seconds:7.0f} MB/s  {seconds / n * 1e3:6.2f} ms/image  "
            f"({(seconds / plain - 1) * 100:+6.1f}% vs plain h5py)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dir", default=None, help="where the temporary stores go (default: the system's tmp)")
    ap.add_argument("--store", type=Path, help="also read this real store both ways")
    args = ap.parse_args()
    data = rows(args.images)
    mb = sum(a.nbytes for a in data.values()) / 1e6
    runs = {
        "write h5py": lambda d: write_h5py(d / "a.h5", data, args.batch, False),
        "write h5py + Fletcher32": lambda d: write_h5py(d / "b.h5", data, args.batch, True),
        "write StoreWriter (Fletcher32 + CRC-32)": lambda d: write_checked(d / "c.h5", data, args.batch),
        "read h5py": lambda d: read_h5py(d / "a.h5"),
        "read h5py + Fletcher32": lambda d: read_h5py(d / "b.h5"),
        "read FeatureStore (Fletcher32 + CRC-32)": lambda d: read_checked(d / "c.h5"),
    }
    best = dict.fromkeys(runs, float("inf"))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for _ in range(args.repeat):
            for name, run in runs.items():
                best[name] = min(best[name], run(Path(tmp)))
    extract = Path("reports/extract.json")
    per_image_extract = 1 / json.loads(extract.read_text())["images_per_s"] if extract.is_file() else None
    print(f"{args.images} images, {mb / args.images:.2f} MB/image, best of {args.repeat}")
    for name, seconds in best.items():
        base = best["write h5py" if name.startswith("write") else "read h5py"]
        print(
            f"{name:40s} {mb / seconds:7.0f} MB/s  {seconds / args.images * 1e3:6.2f} ms/image  "
            f"({(seconds / base - 1) * 100:+6.1f}% vs plain h5py)"
        )
    if per_image_extract:
        extra = (best["write StoreWriter (Fletcher32 + CRC-32)"] - best["write h5py"]) / args.images
        print(
            f"extraction (reports/extract.json) {per_image_extract:.3f} s/image: the checks add "
            f"{extra / per_image_extract * 100:+.2f}% to it"
        )
    if args.store:
        real_store(args.store, args.repeat)


if __name__ == "__main__":
    main()
