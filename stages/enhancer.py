"""Stage `enhancer`: the mixed setting's labelled subset and pseudo-label enhancer, and what it gains.

    python -m stages.enhancer --index data/index/msrc.parquet --folds data/episodes/msrc/folds.json
        --features data/features/msrc.h5 --pseudo data/pseudo/msrc.h5 --model models/enhancer.pt
        --out data/pseudo/msrc-enhanced.h5 --report reports/enhancer.json --figures reports/figures/pseudo

For the main labelled fraction (``mixed.fraction``) it draws the labelled subset (``fscs.pseudo.labelled``),
trains the enhancer(s) on it (``fscs.pseudo.enhancer``) and writes
- ``<model>``: ``{"state_dict": {"fold0": ..., ...} or {"all": ...}, "config": {...}}`` (weights_only load,
  ``fscs.pseudo.enhancer.load_enhancer(path, fold)``; ``config["thresholds"]`` holds each enhancer's mask
  threshold);
- ``<out>``: ``image_ids``, ``enhanced/<name>`` (N, gh, gw) float16 enhanced self maps of every image in the
  store, one per enhancer, and ``labelled_ids`` (the images whose GT masks the mixed setting uses;
  ``fscs.pseudo.enhancer.read_labelled_ids``);
- ``<figures>/pseudo_labels.png``: image | GT | raw pseudo-label | enhanced pseudo-label for a few
  training images outside the labelled subset.

``<report>``: pseudo-label mIoU before and after enhancement on held-out training images, for each fraction
in ``mixed.sweep`` (what is measured: `fscs.pseudo.enhancer_study`). Measured choices: reports/CHOICES.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from fscs.config.params import load_config
from fscs.core.device import describe, resolve_device
from fscs.core.io import atomic_path, write_json
from fscs.core.provenance import recorded
from fscs.data.folds import read_folds
from fscs.data.index import read_index
from fscs.features.online import open_features
from fscs.pseudo.enhancer import enhance, save_enhancer, write_enhanced
from fscs.pseudo.enhancer_figure import pseudo_label_figure
from fscs.pseudo.enhancer_study import (
    StudyData,
    checkpoint_config,
    enhancer_config,
    load_checked_self_maps,
    mixed_config,
    run_fraction,
    study_report,
)
from fscs.pseudo.quality import pseudo_config, stuff_ids, train_images
from stages._common import run_stage, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="image index (parquet)")
    parser.add_argument("--folds", required=True, help="folds.json")
    parser.add_argument("--features", required=True, help="feature store (HDF5)")
    parser.add_argument("--pseudo", required=True, help="pseudo-label file of the pseudo stage (HDF5)")
    parser.add_argument("--model", required=True, help="output enhancer checkpoint (.pt)")
    parser.add_argument("--out", required=True, help="output enhanced pseudo-label file (HDF5)")
    parser.add_argument("--report", required=True, help="output report (JSON)")
    parser.add_argument("--figures", required=True, help="output folder for figures")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    config = load_config(args.params)
    pcfg, cfg, mixed = pseudo_config(config), enhancer_config(config), mixed_config(config)
    index, folds = read_index(args.index), read_folds(args.folds)
    device = resolve_device()  # fscs.pseudo.enhancer trains there; recorded in the checkpoint and report
    torch.set_num_threads(int(cfg["threads"]))
    with open_features(args.features, config, index) as store:
        ids, maps = load_checked_self_maps(args.pseudo, store, pcfg["center_keys"], args.features)
        cfg["in_channels"] = int(maps.shape[1])
        self_maps = {i: maps[r].astype(np.float32) for r, i in enumerate(ids)}
        labels = train_images(index, folds, store, args.index)
        stuff = stuff_ids(pcfg["stuff_classes"], folds, args.folds)
        data = StudyData(store, index, folds, self_maps, labels, pcfg["center_keys"], stuff)
        results = {}
        for fraction in mixed["sweep"]:
            print(f"enhancer: fraction {fraction}", file=sys.stderr)
            results[fraction] = run_fraction(data, fraction, mixed, cfg, pcfg)
        main_run = results[mixed["fraction"]]
        models = main_run["models"]
        enhanced = {name: enhance(m, maps.astype(np.float32)) for name, m in models.items()}
        prov = recorded(store.attrs)

    saved = checkpoint_config(cfg, mixed, models, main_run["labelled"], data.grid, prov)
    saved["device"] = describe(device)
    report = {**study_report(cfg, pcfg, mixed, results), "device": describe(device)}
    fig_dir = Path(args.figures)
    fig_dir.mkdir(parents=True, exist_ok=True)
    report["figure_images"] = pseudo_label_figure(
        data,
        models,
        main_run["labelled"],
        fig_dir / "pseudo_labels.png",
        int(cfg["figures"]),
        pcfg["cst_threshold"],
    )
    save_enhancer(args.model, models, saved)
    with atomic_path(args.out) as tmp:
        write_enhanced(tmp, ids, enhanced, main_run["labelled"], {**saved, "content": "enhanced self maps"})
    write_json(args.report, report)
    n = main_run["numbers"]
    print(
        f"enhancer: {len(models)} enhancer(s) on {n['labelled']} labelled images "
        f"({mixed['fraction']:.0%}) -> "
        f"{args.model}; held-out mIoU self {n['self']['before']} -> {n['self']['after']}, "
        f"pair {n['pair']['before']} -> {n['pair']['after']} ({time.perf_counter() - start:.0f}s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    run_stage(main)
