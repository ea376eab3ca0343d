"""Paper-scale benchmark: store size, extraction speed, and training / evaluation memory flat in N.

    python -m benchmarks.scale [--sizes 500 1000 2000] [--budget-mb 64] [--repeat 3] [--json FILE]

Synthetic 400 px images (random JPEGs, one class rectangle per mask, 4 classes) go through a ViT with the
paper's token grid (patch 8 at 400 px: 50 x 50 patches + CLS = 2,501 tokens) but the tiny random ViT's width
(3 blocks, 2 heads, 48 dims), so that 2,000 images fit a small disk; bytes per image scale as
``2 * (L * 2501 * D + H * d + H * 2500 * d)`` (+ 25 bytes of digests and checksums), printed for ViT-S/8
(L = 12, D = 384, H = 6, d = 64; fp16 and int8) beside the measured width. Each run is a fresh process, so
its peak RSS is its own:

- ``extract``: `fscs.features.extraction.extract_to_store` of the largest N once (smaller N read its first
  rows): images/s and bytes per image (one copy on disk: the pipeline's DVC cache links, `.dvc/config`);
- ``train``: a pass over all N images' tokens (what a real run's first epoch touches: read from the store,
  ``store``, or computed from the images, ``online``, `fscs.features.online.OnlineStore`), then
  `fscs.learn.train.train` on ``--episodes`` pixel-supervised 1-way 1-shot episodes drawn from all N, under
  ``--budget-mb`` for tokens and for prepared features; budget ``none`` is the reference: every image's
  tokens held, as training held its fold's tokens before the budget;
- ``evaluate``: the same pass, then `fscs.learn.predictor.CSTPredictor.prefetch` over ``--episodes``
  1-way 1-shot episodes.

The table gives the pass's images/s, episodes/s and peak RSS (the process's high-water mark, VmHWM) with its
ratio to the smallest N of the same row kind: with a budget it stays near 1, without one it grows with N.
A process's peak RSS moves by about 10% between identical runs (where glibc's heap happens to keep freed
blocks), so ``--repeat K`` reports the median of K runs and their range.
Paper-shaped compute (ViT-S/8 and the CST at 12 layers x 6 heads) is measured by ``--paper`` with
`benchmarks.gpu_smoke.paper_cell`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SIZE, PATCH, CLASSES = 400, 8, 4
RECT = (120, 280)  # the class rectangle of every mask (pixels)


def paper_bytes_per_image(storage: str = "fp16", layers: int = 12, width: int = 384, heads: int = 6) -> int:
    """Bytes of one image's store row at ViT-S/8 400 px shapes (`fscs.features.store.row_bytes`)."""
    from fscs.features.store import row_bytes

    p, d = (SIZE // PATCH) ** 2, width // heads
    shapes = {"tokens": (layers, 1 + p, width), "cls_query": (heads, d), "patch_keys": (heads, p, d)}
    return row_bytes(shapes, storage)


def write_dataset(folder: Path, n: int) -> pd.DataFrame:
    """``n`` random 400 px JPEGs with class masks (class ``1 + i % 4`` in a rectangle), as an image index."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    rows = []
    a, b = RECT
    for i in range(n):
        c = 1 + i % CLASSES
        image, mask = folder / "images" / f"{i:05d}.jpg", folder / "masks" / f"{i:05d}.png"
        if not image.exists():
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(image, quality=85)
            m = np.zeros((SIZE, SIZE), dtype=np.uint8)
            m[a:b, a:b] = c
            Image.fromarray(m, mode="L").save(mask)
        rows.append(
            {
                "image_id": f"{i:05d}",
                "split": "train",
                "image_path": str(image),
                "mask_path": str(mask),
                "height": SIZE,
                "width": SIZE,
                "classes": [c],
                "class_pixels": [(b - a) ** 2],
            }
        )
    return pd.DataFrame(rows).set_index("image_id", drop=False).rename_axis(None)


def backbone() -> Any:
    from fscs.features.backbone import create_backbone
    from fscs.features.names import TINY

    return create_backbone(TINY, SIZE)


def extract(workdir: Path, n: int) -> dict[str, Any]:
    """Write the dataset and its store (the largest N); images/s and bytes per image. A ``--workdir``
    that holds them for the same N is reused, with the numbers measured when it was made."""
    from fscs.features.extraction import extract_to_store

    done = workdir / "extract.json"
    if done.exists() and json.loads(done.read_text())["n"] == n:
        return json.loads(done.read_text())
    index = write_dataset(workdir / "data", n)
    index.to_parquet(workdir / "index.parquet")
    store = workdir / "features.h5"
    if store.exists():
        store.unlink()
    stats = extract_to_store(
        backbone(), list(index.index), list(index["image_path"]), store, batch_size=16, progress=False
    )
    out = {"n": n, "images_per_s": stats["images_per_s"], "bytes_per_image": stats["bytes_per_image"]}
    done.write_text(json.dumps(out))
    return out


def _episodes(index: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = list(index.index)
    rows = []
    for e in range(n):
        q, s = rng.choice(len(ids), 2, replace=False)
        c = int(index.iloc[s]["classes"][0])
        rows.append(
            {
                "fold": 0,
                "episode": e,
                "way": 1,
                "shot": 1,
                "query_id": ids[q],
                "support_classes": [c],
                "support_ids": [[ids[s]]],
                "labels": [int(c in index.iloc[q]["classes"])],
            }
        )
    return pd.DataFrame(rows)


def _tokens(workdir: Path, mode: str, index: pd.DataFrame, budget: int | None) -> Any:
    from fscs.features.online import OnlineStore
    from fscs.features.store import FeatureStore

    if mode == "online":
        return OnlineStore(
            backbone(), dict(zip(index.index, index["image_path"], strict=True)), "all", budget
        )
    return FeatureStore(workdir / "features.h5")


def _rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(
    workdir: Path,
    phase: str,
    mode: str,
    n: int,
    budget_mb: int | None,
    episodes: int,
    allocator: str = "stage",
) -> dict[str, Any]:
    """One measured run (in its own process): episodes/s and peak RSS of training or evaluation."""
    import torch

    from fscs.config.params import TrainConfig
    from fscs.core.allocator import keep_freed_memory
    from fscs.learn.model.cst import CST, config_from_store
    from fscs.learn.predictor import CSTPredictor, TokenBank
    from fscs.learn.targets import Targets
    from fscs.learn.train import train

    torch.set_num_threads(2)
    if allocator == "stage":
        keep_freed_memory()  # as the train and evaluate stages run: glibc keeps up to 1 GiB of freed heap
    budget = None if budget_mb is None else budget_mb * 2**20
    index = pd.read_parquet(workdir / "index.parquet").iloc[:n]
    index = index.set_index("image_id", drop=False).rename_axis(None)
    store = _tokens(workdir, mode, index, budget)
    bank = TokenBank(store, budget)
    targets = Targets("pixel", index, 64)
    model_config = config_from_store(store, support_size=12, pooled_grid=3)
    start_rss = _rss_mib()
    t0 = time.perf_counter()
    ids = list(index.index)
    for i in range(0, n, 32):
        bank.get(ids[i : i + 32])
    pass_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if phase == "train":
        cfg = TrainConfig(
            seed=0, epochs=1, episodes_per_epoch=episodes, batch_size=6, label_size=64, threads=2, patience=0
        )
        train(
            config=cfg,
            tokens=bank,
            model_config=model_config,
            targets=targets,
            index=index,
            train_split="train",
            train_classes=list(range(1, CLASSES + 1)),
            fold=0,
            val_episodes=None,
            progress=False,
            device=torch.device("cpu"),
            prepared_bytes=budget,
        )
    else:
        torch.manual_seed(0)
        model = CST(model_config)
        predictor = CSTPredictor.for_targets(model, bank, targets, 16, 1, budget)
        predictor.prefetch(_episodes(index, episodes, seed=1), progress=False)
    seconds = time.perf_counter() - t0
    return {
        "phase": phase,
        "mode": mode,
        "n": n,
        "budget_mb": budget_mb,
        "allocator": allocator,
        "pass_images_per_s": round(n / pass_s, 1),
        "episodes_per_s": round(episodes / seconds, 2),
        "setup_rss_mib": round(start_rss),
        "peak_rss_mib": round(_rss_mib()),
        "token_cache_peak_mib": round(bank.peak_bytes / 2**20),
    }


def _child(
    workdir: Path, phase: str, mode: str, n: int, budget_mb: int | None, episodes: int, allocator: str
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--case", phase, mode, str(n), str(budget_mb or 0)]
    cmd += ["--episodes", str(episodes), "--allocator", allocator]
    out = subprocess.run(cmd + ["--workdir", str(workdir)], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of repeated runs: the median run by peak RSS, with the runs' peak RSS range."""
    runs = sorted(runs, key=lambda r: r["peak_rss_mib"])
    row = dict(runs[len(runs) // 2])
    row["peak_rss_range_mib"] = [runs[0]["peak_rss_mib"], runs[-1]["peak_rss_mib"]]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown rows with each kind's peak RSS relative to its smallest N."""
    lines = [
        "| phase | tokens | budget (MiB) | N | pass images/s | episodes/s | setup RSS (MiB) | peak RSS (MiB) "
        "| vs smallest N |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    first: dict[tuple, float] = {}
    for r in rows:
        key = (r["phase"], r["mode"], r["budget_mb"])
        base = first.setdefault(key, r["peak_rss_mib"])
        budget = r["budget_mb"] if r["budget_mb"] else "none"
        lo, hi = r.get("peak_rss_range_mib", [r["peak_rss_mib"]] * 2)
        spread = f" ({lo}-{hi})" if hi > lo else ""
        lines.append(
            f"| {r['phase']} | {r['mode']} | {budget} | {r['n']:,} | {r['pass_images_per_s']} | "
            f"{r['episodes_per_s']} | "
            f"{r['setup_rss_mib']} | {r['peak_rss_mib']}{spread} | {r['peak_rss_mib'] / base:.2f}x |"
        )
    return "\n".join(lines)


def paper(images: int = 2, steps: int = 2) -> dict[str, Any]:
    """ViT-S/8 at 400 px and the paper's CST on this machine's CPU (`benchmarks.gpu_smoke.paper_cell`)."""
    import torch

    from benchmarks.gpu_smoke import PAPER, paper_cell

    return paper_cell(torch.device("cpu"), PAPER, steps=steps, batch=2, episodes=4, images=images)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--budget-mb", type=int, default=64, help="tokens and prepared features, each")
    ap.add_argument("--episodes", type=int, default=48, help="training / evaluation episodes per run")
    ap.add_argument("--modes", nargs="+", default=["store", "online"], choices=["store", "online"])
    ap.add_argument(
        "--allocator",
        default="stage",
        choices=["stage", "glibc"],
        help="stage: glibc set as the stages set it (fscs.core.allocator); glibc: its defaults",
    )
    ap.add_argument("--phases", nargs="+", default=["train", "evaluate"], choices=["train", "evaluate"])
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per row: the peak RSS is their median (min-max shown)"
    )
    ap.add_argument("--workdir", help="keep the data here (default: a temporary folder)")
    ap.add_argument("--paper", action="store_true", help="also time ViT-S/8 at 400 px and the paper's CST")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--case", nargs=4, metavar=("PHASE", "MODE", "N", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        phase, mode, n, budget = args.case
        case = run_case(
            Path(args.workdir), phase, mode, int(n), int(budget) or None, args.episodes, args.allocator
        )
        print(json.dumps(case))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        sizes = sorted(args.sizes)
        ext = extract(workdir, sizes[-1])
        print(
            f"extraction: {ext['images_per_s']} images/s, {ext['bytes_per_image']:,} bytes/image at width "
            f"48; ViT-S/8 at 400 px: {paper_bytes_per_image():,} bytes/image in fp16, "
            f"{paper_bytes_per_image('int8'):,} in int8"
        )
        rows = []
        for phase in args.phases:
            for mode in args.modes:
                kinds = [args.budget_mb] + ([None] if mode == "store" else [])
                for budget in kinds:
                    for n in sizes:
                        runs = [
                            _child(workdir, phase, mode, n, budget, args.episodes, args.allocator)
                            for _ in range(args.repeat)
                        ]
                        rows.append(median_row(runs))
                        print(json.dumps(rows[-1]), flush=True)
        print(table(rows))
        doc: dict[str, Any] = {
            "extract": ext,
            "rows": rows,
            "paper_bytes_per_image": paper_bytes_per_image(),
            "paper_bytes_per_image_int8": paper_bytes_per_image("int8"),
        }
        if args.paper:
            doc["paper_cpu"] = paper()
            print(f"paper shapes on this CPU: {doc['paper_cpu']}")
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
