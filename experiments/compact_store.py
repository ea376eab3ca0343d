"""Compact feature store (`backbone.storage`): bytes per image, reconstruction error, MSRC metrics per type.

    python -m experiments.compact_store --features data/features/msrc.h5 --out /tmp/compact \
        --table /tmp/compact_store.md [--steps convert pseudo baselines learner reference table]

``convert`` rewrites the fp16 store's rows as a bf16 and an int8 store under ``--out`` (an approximation of
re-extraction with ``backbone.storage`` set, exact if extraction rounds to float16 before storing) and
measures the error of what they read back against the fp16 rows. ``pseudo`` re-derives the pseudo-labels
from each converted store (the pseudo stage), ``baselines`` runs the baselines stage on every fold with each,
``learner`` trains and evaluates the pixel setting's folds 0 and 1 (train and evaluate stages), each with a
params copy whose ``backbone.storage`` names the store's type and every output under ``--out``;
``reference`` trains and evaluates the same cells on the fp16 store with this code (the committed reports
may come from other code). ``table`` writes the markdown table: sizes from `fscs.features.store.row_bytes`
for the MSRC shape and the paper's, errors, and mIoU beside the fp16 numbers of the committed reports.
Steps whose outputs exist are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fscs.features.store import (
    DIGESTED,
    SHARD_ATTRS,
    FeatureStore,
    StoreWriter,
    decode,
    encode,
    iter_batches,
    row_bytes,
)

COMPACT = ("bf16", "int8")
SETTINGS = ("1way1shot", "1way5shot", "2way1shot", "2way5shot")
BASELINES = ("attention", "prototype", "prototype_gt")
LEARNER_FOLDS = (0, 1)

#: Per-image shapes (L blocks, 1+P tokens, D, H heads, d = D/H, P patches) the sizes are given for.
SHAPES = {
    "MSRC (DINOv2 ViT-S/14, 224 px)": (12, 257, 384, 6, 64, 256),
    "paper (ViT-S/8, 400 px)": (12, 2501, 384, 6, 64, 2500),
}

#: Images of the datasets whose store size at the paper's shape the table gives.
TOTALS = {"PASCAL-5i": 12_031, "COCO-20i": 123_287}

#: The learner's seed spread, as reports/LEARNER.md ("Seed spread") states it.
SEED_SPREAD = (
    'Seed spread of the pixel learner (reports/LEARNER.md, "Seed spread": test, fold 0, seeds 0 / 1 / 2): '
    "mIoU 36.7 / 37.8 / 29.5 (1w1s), 35.3 / 36.2 / 34.3 (1w5s), 36.5 / 37.3 / 30.6 (2w1s), "
    "36.6 / 38.7 / 37.0 (2w5s), up to 8 points; the same file's rounding spread moves a fold by up to "
    "7.5 mIoU. The training-free baselines move by 0.0 across hosts."
)


def shapes_of(layers: int, tokens: int, dim: int, heads: int, head_dim: int, patches: int) -> dict:
    """The store's per-image dataset shapes for a backbone shape."""
    return {
        "tokens": (layers, tokens, dim),
        "cls_query": (heads, head_dim),
        "patch_keys": (heads, patches, head_dim),
    }


def formula(storage: str) -> str:
    """`row_bytes` written out for ``storage`` (L blocks, T = 1+P tokens, D, H heads, d, P patches)."""
    values = "L*T*D + H*d + H*P*d"
    if storage == "int8":
        return f"{values} + 2*(L*T + H + H*P) + 3*4 + 1 + 6*4"
    return f"2*({values}) + 3*4 + 1 + 3*4"


# ---- convert ---------------------------------------------------------------------------------------------
def convert(source: Path, out: Path, storage: str) -> dict[str, Any]:
    """Write the rows of the store at ``source`` in ``storage`` to ``out``; the error of what decodes back,
    per vector over the last axis, against the source rows (relative L2 mean and max, max absolute)."""
    with FeatureStore(source) as fs:
        skip = {"complete", "image_ids_sha256", "storage", *SHARD_ATTRS}
        attrs = {k: v for k, v in fs.attrs.items() if k not in skip}
        first = fs.image_ids[0]
        shapes = {"tokens": fs.tokens(first).shape, "cls_query": fs.cls_query(first).shape}
        shapes["patch_keys"] = fs.patch_keys(first).shape
        err = {name: {"rel_sum": 0.0, "vectors": 0, "rel_max": 0.0, "abs_max": 0.0} for name in DIGESTED}
        with StoreWriter(out, fs.image_ids, attrs, shapes, storage=storage) as writer:
            for rows in iter_batches(len(fs), 8):
                ids = [fs.image_ids[r] for r in rows]
                batch = {
                    "tokens": np.stack([fs.tokens(i) for i in ids]),
                    "cls_query": np.stack([fs.cls_query(i) for i in ids]),
                    "patch_keys": np.stack([fs.patch_keys(i) for i in ids]),
                }
                for name, x in batch.items():
                    _add_error(err[name], x.astype(np.float32), decode(storage, encode(storage, x)))
                writer.write(rows, batch["tokens"], batch["cls_query"], batch["patch_keys"])
            writer.finalize()
    with FeatureStore(out) as back, FeatureStore(source) as fs:  # the store returns what was measured
        for image_id in fs.image_ids[:: max(1, len(fs) // 16)]:
            want = decode(storage, encode(storage, fs.tokens(image_id)))
            if not np.array_equal(back.tokens(image_id), want):
                raise SystemExit(f"{out}: {image_id} reads back other tokens than it was measured with")
    return {
        "storage": storage,
        "images": len(fs.image_ids),
        "file_bytes": out.stat().st_size,
        "row_bytes": row_bytes(shapes, storage),
        "error": {
            name: {
                "rel_l2_mean": e["rel_sum"] / e["vectors"],
                "rel_l2_max": e["rel_max"],
                "abs_max": e["abs_max"],
            }
            for name, e in err.items()
        },
    }


def _add_error(acc: dict[str, float], x: np.ndarray, back: np.ndarray) -> None:
    """Accumulate per-vector relative L2 and absolute errors of ``back`` (float16) against ``x``."""
    diff = back.astype(np.float32) - x
    norm = np.linalg.norm(x, axis=-1)
    rel = np.linalg.norm(diff, axis=-1)[norm > 0] / norm[norm > 0]
    acc["rel_sum"] += float(rel.sum())
    acc["vectors"] += int(rel.size)
    acc["rel_max"] = max(acc["rel_max"], float(rel.max(initial=0.0)))
    acc["abs_max"] = max(acc["abs_max"], float(np.abs(diff).max()))


# ---- stages ----------------------------------------------------------------------------------------------
def params_copy(params: Path, out: Path, storage: str) -> Path:
    """A copy of params.yaml with ``backbone.storage`` set to ``storage`` (the stages check the store)."""
    doc = yaml.safe_load(params.read_text())
    doc["backbone"]["storage"] = storage
    path = out / f"params-{storage}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(args: list[str], log: Path, out: Path) -> None:
    """Run ``python -m <args>`` writing ``out`` (its folder made first), its output appended to ``log``;
    stop on failure naming the log."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ python -m {' '.join(args)}\n")
        f.flush()
        done = subprocess.run([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise SystemExit(f"python -m {args[0]} failed (exit {done.returncode}); see {log}")


def stage_inputs(args: argparse.Namespace) -> list[str]:
    return ["--index", str(args.index), "--folds", str(args.folds), "--episodes", str(args.episodes)]


def learner(args: argparse.Namespace, storage: str, common: list[str], log: Path) -> None:
    """Train and evaluate the pixel setting's `LEARNER_FOLDS` on one store (train and evaluate stages)."""
    for fold in LEARNER_FOLDS:
        ckpt = args.out / f"models-{storage}" / f"pixel-fold{fold}.pt"
        out = args.out / f"eval-{storage}" / f"pixel-fold{fold}.json"
        cell = ["--supervision", "pixel", "--fold", str(fold), *stage_inputs(args), *common]
        if not ckpt.is_file():
            curve = args.out / f"pixel-fold{fold}-{storage}.csv"
            run(["stages.train", *cell, "--out", str(ckpt), "--curve", str(curve)], log, ckpt)
        if not out.is_file():
            run(["stages.evaluate", *cell, "--checkpoint", str(ckpt), "--out", str(out)], log, out)


# ---- table -----------------------------------------------------------------------------------------------
def _mean_miou(files: list[Path], name: str) -> list[float]:
    """Mean over the fold files of baseline ``name``'s mIoU, per setting."""
    docs = [json.loads(f.read_text())["baselines"][name] for f in files]
    return [float(np.mean([d[s]["miou"] for d in docs])) for s in SETTINGS]


def _learner_miou(path: Path) -> list[float]:
    return [float(json.loads(path.read_text())["results"][s]["miou"]) for s in SETTINGS]


def _cells(values: list[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def table(args: argparse.Namespace) -> str:
    """The markdown table of sizes, errors and MSRC mIoU per storage type (fp16: the committed reports)."""
    msrc_shape, paper_shape = (shapes_of(*s) for s in SHAPES.values())
    metrics = json.loads(args.metrics.read_text())
    conv = {s: json.loads((args.out / f"convert-{s}.json").read_text()) for s in COMPACT}
    columns = [
        "storage",
        "bytes/image MSRC",
        "bytes/image paper shape",
        *(f"{name} ({n:,} images, paper shape)" for name, n in TOTALS.items()),
        "tokens rel. L2 mean / max",
        "tokens max abs",
        "q / k rel. L2 max",
        *(f"baseline {b} mIoU" for b in BASELINES),
        *(f"pixel learner mIoU fold {f}" for f in LEARNER_FOLDS),
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for storage in ("fp16", *COMPACT):
        msrc, paper = row_bytes(msrc_shape, storage), row_bytes(paper_shape, storage)
        totals = [f"{paper * n / 1e9:,.1f} GB" for n in TOTALS.values()]
        if storage == "fp16":
            errors = ["0 (reference)", "0", "0"]
            base_files = [args.reports / "eval" / "baselines" / f"fold{f}.json" for f in range(4)]
            learner = [
                [float(metrics["pixel"]["folds"][str(f)][s]["miou"]) for s in SETTINGS] for f in LEARNER_FOLDS
            ]
        else:
            e = conv[storage]["error"]
            errors = [
                f"{e['tokens']['rel_l2_mean']:.2e} / {e['tokens']['rel_l2_max']:.2e}",
                f"{e['tokens']['abs_max']:.3g}",
                f"{e['cls_query']['rel_l2_max']:.2e} / {e['patch_keys']['rel_l2_max']:.2e}",
            ]
            base_files = [args.out / f"baselines-{storage}" / f"fold{f}.json" for f in range(4)]
            learner = [
                _learner_miou(args.out / f"eval-{storage}" / f"pixel-fold{f}.json") for f in LEARNER_FOLDS
            ]
        base = [_cells(_mean_miou(base_files, b)) for b in BASELINES]
        row = [storage, f"{msrc:,}", f"{paper:,}", *totals, *errors, *base, *(_cells(v) for v in learner)]
        lines.append("| " + " | ".join(row) + " |")
        if storage == "fp16" and (args.out / "eval-fp16").is_dir():
            rerun = [
                _cells(_learner_miou(args.out / "eval-fp16" / f"pixel-fold{f}.json")) for f in LEARNER_FOLDS
            ]
            blank = ["same as above"] * (len(columns) - 1 - len(rerun))
            lines.append("| " + " | ".join(["fp16, learner re-run with this code", *blank, *rerun]) + " |")
    measured = ", ".join(f"{s} {conv[s]['file_bytes'] / conv[s]['images']:,.0f}" for s in COMPACT)
    notes = [
        "",
        "Bytes per image: `fscs.features.store.row_bytes` (stored data, 3 CRC-32 digests, the done flag, one "
        "Fletcher32 checksum per row chunk), L blocks, T = 1+P tokens, D dims, H heads of d dims, P patches:",
        *(f"- {s}: `{formula(s)}`" for s in ("fp16", "bf16", "int8")),
        f"- MSRC L, T, D, H, d, P = {SHAPES['MSRC (DINOv2 ViT-S/14, 224 px)']}; paper "
        f"{SHAPES['paper (ViT-S/8, 400 px)']}. Measured MSRC files (bytes / image, HDF5 overhead "
        f"included): {measured}.",
        "",
        "mIoU cells: 1way1shot / 1way5shot / 2way1shot / 2way5shot, test episodes; baselines the mean of the "
        "4 folds; fp16 from the committed reports (reports/eval/baselines, reports/metrics.json). bf16 and "
        "int8 stores were converted from the fp16 rows (an approximation of re-extracting with "
        "`backbone.storage`), their pseudo-labels re-derived from them; errors per vector (token over D, "
        "query and key per head) of what the store reads back (float16) against the fp16 rows.",
        "",
        SEED_SPREAD,
    ]
    return "\n".join(lines + notes) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, default=Path("data/features/msrc.h5"), help="the fp16 store")
    ap.add_argument("--index", type=Path, default=Path("data/index/msrc.parquet"))
    ap.add_argument("--folds", type=Path, default=Path("data/episodes/msrc/folds.json"))
    ap.add_argument("--episodes", type=Path, default=Path("data/episodes/msrc"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--reports", type=Path, default=Path("reports"), help="committed reports (fp16 numbers)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the stores and every output")
    ap.add_argument("--table", type=Path, required=True, help="markdown table to write")
    ap.add_argument(
        "--steps", nargs="+", default=["convert", "pseudo", "baselines", "learner", "reference", "table"],
        choices=["convert", "pseudo", "baselines", "learner", "reference", "table"],
    )  # fmt: skip
    args = ap.parse_args()
    args.metrics = args.reports / "metrics.json"
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"stages-{'-'.join(args.steps)}.log"
    if "reference" in args.steps:  # the fp16 store and params with this code: the learner's reference
        learner(args, "fp16", ["--params", str(args.params), "--features", str(args.features)], log)
    for storage in COMPACT:
        store = args.out / f"msrc-{storage}.h5"
        params = params_copy(args.params, args.out, storage)
        pseudo = args.out / f"pseudo-{storage}.h5"
        common = ["--params", str(params), "--features", str(store)]
        if "convert" in args.steps and not (args.out / f"convert-{storage}.json").is_file():
            stats = convert(args.features, store, storage)
            (args.out / f"convert-{storage}.json").write_text(json.dumps(stats, indent=1))
        if "pseudo" in args.steps and not pseudo.is_file():
            run(
                ["stages.pseudo", "--index", str(args.index), "--folds", str(args.folds), *common,
                 "--out", str(pseudo), "--report", str(args.out / f"pseudo-{storage}.json"),
                 "--plot", str(args.out / f"pseudo-{storage}.csv")],
                log,
                pseudo,
            )  # fmt: skip
        for fold in range(4) if "baselines" in args.steps else ():
            out = args.out / f"baselines-{storage}" / f"fold{fold}.json"
            if not out.is_file():
                run(
                    ["stages.baselines", "--fold", str(fold), *stage_inputs(args), *common,
                     "--pseudo", str(pseudo), "--out", str(out), "--quiet"],
                    log,
                    out,
                )  # fmt: skip
        if "learner" in args.steps:
            learner(args, storage, common, log)
    if "table" in args.steps:
        args.table.write_text(table(args))
        print(args.table.read_text())


if __name__ == "__main__":
    main()
