"""Stage `pseudo`: attention pseudo-labels from the feature store, and their quality against GT masks.

    python -m stages.pseudo --index data/index/msrc.parquet --folds data/episodes/msrc/folds.json
        --features data/features/msrc.h5 --out data/pseudo/msrc.h5 --report reports/pseudo.json
        --plot reports/plots/pseudo_threshold.csv [--params params.yaml]

Writes ``<out>``: ``image_ids`` and the per-head self cosine maps ``self_maps`` (N, H, gh, gw) float16 of
every image in the store, with the recipe params and the store's provenance as attributes; ``<report>``: the
pseudo-labels' quality on the training split (what is measured: `fscs.pseudo.quality`); ``<plot>``: the
threshold sweep (threshold, recipe, miou). Measured choices: reports/CHOICES.md.
"""

from __future__ import annotations

import csv
import sys
import time

import torch

from fscs.config.params import load_config
from fscs.core.io import atomic_path, write_json
from fscs.core.provenance import recorded
from fscs.data.folds import read_folds
from fscs.data.index import read_index
from fscs.features.online import open_features
from fscs.pseudo.attention import write_self_maps
from fscs.pseudo.quality import (
    measure,
    pseudo_config,
    quality_report,
    self_maps,
    self_maps_attrs,
    stuff_ids,
    sweep_rows,
    train_images,
)
from stages._common import run_stage, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="image index (parquet)")
    parser.add_argument("--folds", required=True, help="folds.json")
    parser.add_argument("--features", required=True, help="feature store (HDF5)")
    parser.add_argument("--out", required=True, help="output pseudo-label file (HDF5)")
    parser.add_argument("--report", required=True, help="output quality report (JSON)")
    parser.add_argument("--plot", required=True, help="output threshold sweep (CSV: threshold, recipe, miou)")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    config = load_config(args.params)
    cfg = pseudo_config(config)
    torch.set_num_threads(1)  # small maps: more threads only add contention
    index = read_index(args.index)
    folds = read_folds(args.folds)
    stuff = stuff_ids(cfg["stuff_classes"], folds, args.folds)
    with open_features(args.features, config, index) as store:
        labels = train_images(index, folds, store, args.index)
        ids, maps = self_maps(store, cfg["center_keys"])
        res = measure(store, index, labels, cfg, stuff)
        prov = recorded(store.attrs)

    with atomic_path(args.out) as tmp:
        write_self_maps(tmp, ids, maps, self_maps_attrs(cfg, prov))
    write_json(args.report, quality_report(cfg, folds, labels, res, prov))
    with atomic_path(args.plot) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["threshold", "recipe", "miou"])
            w.writerows(sweep_rows(res))
    d = res["dino"]
    print(
        f"pseudo: {len(ids)} images -> {args.out}; "
        f"train-split mIoU ({len(labels)} images, {res['pairs']} pairs) self/pair: "
        f"cst@{cfg['cst_threshold']} {res['cst']['self']['miou']}/{res['cst']['pair']['miou']}, "
        f"centred {res['cst_centered']['self']['miou']}/{res['cst_centered']['pair']['miou']}, "
        f"dino {d['self']['miou']}/{d['pair']['miou']}, "
        f"all-foreground {res['all_foreground']['self_miou']}/{res['all_foreground']['pair_miou']} "
        f"({time.perf_counter() - start:.1f}s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    run_stage(main)
