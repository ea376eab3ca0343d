"""Stage `enhancer`: the mixed setting's labelled subset and pseudo-label enhancer, and what it gains.

    python -m stages.enhancer --index data/index/msrc.parquet --folds data/episodes/msrc/folds.json
        --features data/features/msrc.h5 --pseudo data/pseudo/msrc.h5 --model models/enhancer.pt
        --out data/pseudo/msrc-enhanced.h5 --report reports/enhancer.json --figures reports/figures/pseudo

For the main labelled fraction (``mixed.fraction``) it draws the labelled subset (``fscs.labelled``), trains
the enhancer(s) on it (``fscs.enhancer``) and writes
- ``<model>``: ``{"state_dict": {"fold0": ..., ...} or {"all": ...}, "config": {...}}`` (weights_only load,
  ``fscs.enhancer.load_enhancer(path, fold)``; ``config["thresholds"]`` holds each enhancer's mask threshold);
- ``<out>``: ``image_ids``, ``enhanced/<name>`` (N, gh, gw) float16 enhanced self maps of every image in the
  store, one per enhancer, and ``labelled_ids`` (the images whose GT masks the mixed setting uses;
  ``fscs.enhancer.read_labelled_ids``);
- ``<figures>/pseudo_labels.png``: image | GT | raw pseudo-label | enhanced pseudo-label for a few
  training images outside the labelled subset.

``<report>``: pseudo-label mIoU before (raw ``cst`` maps at ``pseudo.cst_threshold``) and after (enhanced, at
the enhancer's calibrated threshold) on the training-split images OUTSIDE the labelled subset, for self maps
(image's labels) and pair maps (seeded (support, query, class) pairs as in the pseudo stage), void ignored, at
original image size; for each fraction in ``mixed.sweep`` with a freshly drawn subset and freshly trained
enhancer(s). Per fold, mIoU is over the fold's training classes (the headline: what the fold's training
uses), and separately over its object / stuff training classes and its test classes (classes the enhancer
never saw a mask of). ``after_oracle`` (best grid threshold on the held-out GT) is a diagnostic only.

Choices, measured on MSRC (fraction 0.1, reports/enhancer.json and the issue note):
- ``per_fold``: one enhancer per fold, trained on masks of the fold's TRAINING classes only, so no mask of a
  class a fold tests on is ever used (the enhancer is class-agnostic, but this keeps novel-class masks out of
  the mixed setting entirely). One overall enhancer was no better (50.1 vs 51.2 mIoU at 300 steps) at 1/4
  of the cost;
  the test split is never used either way.
- ``train_classes: objects``: targets are GT == c for object classes c only. With every class as a target
  (MSRC labels every pixel with one of the image's ~2.6 classes, stuff included) the class-agnostic input
  cannot tell which class is asked, the best BCE output is ~1/k everywhere (loss stayed at 0.63) and
  enhanced maps were WORSE than raw (36 vs 41 mIoU). Object targets make the target the salient object(s),
  which attention predicts: 41 -> 51 mIoU (object classes 48 -> 68; stuff classes 20 -> 9) at 300 steps.
- ``threshold: auto``: the mask threshold is picked on the labelled subset (grid 0.2-0.7), not fixed at 0.5.
- ``inputs: both`` (self and pair maps; +1 mIoU over either alone), ``loss: bce`` (bce+dice within 0.2),
  ``steps: 100`` (52.3 mIoU; 51.9 at 150, 51.2 at 300: ~90 samples overfit), grid-resolution
  input (maps upsampled x2 first: +0.3 mIoU for 3x the training time, not taken).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fscs.config import Config, load_config
from fscs.data.folds import read_folds
from fscs.data.images import VOID, load_mask, load_rgb
from fscs.data.index import read_index
from fscs.enhancer import (
    DEFAULT_CONFIG,
    binary_target,
    enhance,
    save_enhancer,
    train_enhancer,
    write_enhanced,
)
from fscs.errors import FscsError
from fscs.io import atomic_path, write_json
from fscs.labelled import select_labelled
from fscs.overlay import overlay, save_grid
from fscs.pseudo import (
    IoUCounter,
    check_provenance,
    cst_foreground,
    head_cosine,
    provenance,
    read_self_maps,
    sample_pairs,
    upsample,
)
from fscs.store import FeatureStore, expected_attrs
from stages._common import run_stage, stage_parser
from stages.pseudo import pseudo_config, stuff_ids, train_images


def enhancer_config(config: Config) -> dict:
    """The validated ``enhancer`` section as a dict."""
    return config.enhancer.model_dump()


def mixed_config(config: Config) -> dict:
    """The validated ``mixed`` section as a dict; the sweep always includes the fraction, sorted."""
    m = config.mixed
    return {"fraction": m.fraction, "sweep": sorted(set(m.sweep) | {m.fraction}), "seed": m.seed}


class Data:
    """Everything the enhancer needs in memory: training-split labels, GT masks, per-head self maps."""

    def __init__(
        self,
        store: FeatureStore,
        index,
        folds: dict,
        self_maps: dict[str, np.ndarray],
        labels,
        center: bool,
        stuff: set[int] | None = None,
    ):
        self.store, self.index, self.folds, self.center = store, index, folds, center
        self.stuff = set(stuff or ())
        self.labels: dict[str, list[int]] = labels
        self.self_cos = self_maps
        self.grid = store.grid
        self.gt = {
            i: load_mask(index.loc[i, "mask_path"]) for i in tqdm(sorted(labels), desc="GT", disable=None)
        }
        self.classes = sorted({c for cs in labels.values() for c in cs})
        self.fold_ids = sorted(folds["folds"], key=int)
        self._pair_cache: dict[tuple[str, str], np.ndarray] = {}

    def pair_cos(self, support: str, query: str) -> np.ndarray:
        key = (support, query)
        if key not in self._pair_cache:
            cos = head_cosine(self.store.cls_query(support), self.store.patch_keys(query), self.center)
            self._pair_cache[key] = cos.reshape(-1, *self.grid)
        return self._pair_cache[key]

    def fold_classes(self, fold: str, role: str) -> list[int]:
        return [int(c) for c in self.folds["folds"][fold][role]]


def training_set(
    data: Data, labelled: list[str], classes: set[int], cfg: dict, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (n, H, gh, gw), targets (n, L, L)) from the labelled images' labels within ``classes``."""
    xs, ys = [], []
    size = int(cfg["label_size"])
    lab = set(labelled)
    if cfg["inputs"] in ("self", "both"):
        for i in labelled:
            for c in data.labels[i]:
                if c in classes:
                    xs.append(data.self_cos[i])
                    ys.append(binary_target(data.gt[i], c, size))
    if cfg["inputs"] in ("pair", "both"):
        # supports: any training image labelled c (image-level labels only); queries: the labelled images
        pairs = sample_pairs(data.labels, sorted(classes), int(cfg["pairs_per_label"]), seed)
        for s, q, c in pairs:
            if q in lab:
                xs.append(data.pair_cos(s, q))
                ys.append(binary_target(data.gt[q], c, size))
    if not xs:
        raise FscsError(
            f"enhancer: no training samples among {len(labelled)} labelled images "
            f"for classes {sorted(classes)}"
        )
    return np.stack(xs).astype(np.float32), np.stack(ys)


def evaluate(
    data: Data,
    models: dict[str, Any],
    images: list[str],
    pairs: list[tuple[str, str, int]],
    threshold: float,
    grid: list[float],
) -> dict[str, dict[str, IoUCounter]]:
    """IoU counters per model name for self maps of ``images`` and the ``pairs`` (support, query, class):
    ``raw`` = the un-enhanced cst map at ``threshold``; each enhancer at the thresholds of ``grid`` and at
    its own (calibrated) threshold."""
    out = {"raw": {k: IoUCounter([threshold]) for k in ("self", "pair")}}
    for name, m in models.items():
        out[name] = {
            k: IoUCounter(sorted({float(t) for t in grid} | {float(m.threshold)})) for k in ("self", "pair")
        }
    by_query: dict[str, list[tuple[str, int]]] = {}
    for s, q, c in pairs:
        by_query.setdefault(q, []).append((s, c))
    for q in tqdm(images, desc="evaluate", disable=None, leave=False):
        gt = data.gt[q]
        valid = gt != VOID
        cos = [data.self_cos[q]] + [data.pair_cos(s, q) for s, _ in by_query.get(q, [])]
        maps = {"raw": [cst_foreground(x) for x in cos]}
        for name, model in models.items():
            maps[name] = list(enhance(model, np.stack(cos)))
        for name, fgs in maps.items():
            self_up = upsample(fgs[0], gt.shape)
            for c in data.labels[q]:
                out[name]["self"].add(c, self_up, gt == c, valid)
            for (_s, c), fg in zip(by_query.get(q, []), fgs[1:], strict=True):
                out[name]["pair"].add(c, upsample(fg, gt.shape), gt == c, valid)
    return out


def _mean(counter: IoUCounter, classes: list[int], t: int = 0) -> float | None:
    vals = [counter.iou(c, t) for c in classes]
    vals = [v for v in vals if v is not None]
    return round(float(np.mean(vals)), 2) if vals else None


def run_fraction(
    data: Data, fraction: float, mixed: dict, cfg: dict, pcfg: dict, progress: bool = True
) -> dict:
    """Draw the subset, train the enhancer(s), measure before/after. Returns models, subset and numbers."""
    train_ids = sorted(data.labels)
    labelled = select_labelled(data.index.loc[train_ids], data.classes, fraction, mixed["seed"])
    lab = set(labelled)
    heldout = [i for i in train_ids if i not in lab]
    t0 = time.perf_counter()
    models, history, samples = {}, {}, {}
    # classes each enhancer may see masks of (its fold's training classes) and is measured on
    own = (
        {f"fold{f}": data.fold_classes(f, "train") for f in data.fold_ids}
        if cfg["per_fold"]
        else {"all": list(data.classes)}
    )
    unseen = {f"fold{f}": data.fold_classes(f, "test") for f in data.fold_ids} if cfg["per_fold"] else {}
    for name, classes in own.items():
        trained_on = {c for c in classes if cfg["train_classes"] == "all" or c not in data.stuff}
        x, y = training_set(data, labelled, trained_on, cfg, pcfg["seed"])
        models[name], history[name] = train_enhancer(x, y, cfg, progress=progress)
        samples[name] = int(len(x))
    train_s = time.perf_counter() - t0
    # evaluation pairs: queries outside the subset, supports any training image (image-level labels only)
    pairs = [
        p
        for p in sample_pairs(data.labels, data.classes, pcfg["pairs_per_label"], pcfg["seed"])
        if p[1] not in lab
    ]
    res = evaluate(data, models, heldout, pairs, pcfg["cst_threshold"], cfg["threshold_grid"])

    def before_after(kind: str, classes: list[int], name: str) -> dict:
        counter = res[name][kind]
        t_own = counter.thresholds.index(float(models[name].threshold))
        oracle = [_mean(counter, classes, t) or 0.0 for t in range(len(counter.thresholds))]
        return {
            "before": _mean(res["raw"][kind], classes),
            "after": _mean(counter, classes, t_own),
            "after_oracle": round(max(oracle), 2),  # best grid threshold on held-out GT: diagnostic only
        }

    per_model = {}
    for name, classes in own.items():
        roles = {
            "train_classes": classes,
            "object_classes": [c for c in classes if c not in data.stuff],
            "stuff_classes": [c for c in classes if c in data.stuff],
        }
        if name in unseen:
            roles["test_classes"] = unseen[name]
        per_model[name] = {
            role: {k: before_after(k, cl, name) for k in ("self", "pair")} for role, cl in roles.items() if cl
        }
    out: dict[str, Any] = {
        "labelled": len(labelled),
        "labelled_fraction": round(len(labelled) / len(train_ids), 4),
        "heldout_images": len(heldout),
        "heldout_pairs": len(pairs),
        "train_samples": samples,
        "train_seconds": round(train_s, 1),
        "final_loss": {k: round(v[-1], 4) for k, v in history.items()},
        "thresholds": {k: m.threshold for k, m in models.items()},
    }
    roles = sorted({r for m in per_model.values() for r in m})
    for kind in ("self", "pair"):
        block = {}
        for role in roles:
            have = [m[role][kind] for m in per_model.values() if role in m]
            block[role] = {
                when: round(float(np.mean([h[when] for h in have if h[when] is not None])), 2)
                for when in ("before", "after", "after_oracle")
            }
        out[kind] = {**block["train_classes"], **block}  # headline: the classes each enhancer serves
    if cfg["per_fold"]:
        out["folds"] = per_model
    return {"models": models, "labelled": labelled, "numbers": out, "history": history}


def figure(
    data: Data, models: dict, labelled: list[str], path: Path, count: int, threshold: float
) -> list[str]:
    """image | GT | raw | enhanced overlays for ``count`` held-out training images (spread over the ids)."""
    held = [i for i in sorted(data.labels) if i not in set(labelled) and data.labels[i]]
    if not held or count < 1:
        return []
    picks = [held[int(j)] for j in np.linspace(0, len(held) - 1, min(count, len(held))).round()]
    rows, names = [], []
    first = sorted(models)[0]
    for i in picks:
        img = load_rgb(data.index.loc[i, "image_path"])
        gt = data.gt[i]
        # the largest object class among the image's labels (else the largest class) paints the pseudo-labels
        objects = [k for k in data.labels[i] if k not in data.stuff] or data.labels[i]
        c = max(objects, key=lambda k: int((gt == k).sum()))
        name = first
        if len(models) > 1:  # a fold whose training classes include c
            name = next((f"fold{f}" for f in data.fold_ids if c in data.fold_classes(f, "train")), first)
        raw = upsample(cst_foreground(data.self_cos[i]), gt.shape) >= threshold
        enh = upsample(enhance(models[name], data.self_cos[i][None])[0], gt.shape) >= models[name].threshold
        rows.append([img, overlay(img, gt, 0.5), overlay(img, raw * c, 0.5), overlay(img, enh * c, 0.5)])
        names.append(f"{i} ({data.folds['classes'].get(str(c), c)}, {name})")
    save_grid(
        rows,
        path,
        titles=["image", "GT", f"raw pseudo-label (>= {threshold})", "enhanced (calibrated threshold)"],
        row_labels=names,
    )
    return picks


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
    params = config.params()
    pcfg, cfg, mixed = pseudo_config(config), enhancer_config(config), mixed_config(config)
    index, folds = read_index(args.index), read_folds(args.folds)
    torch.set_num_threads(int(cfg["threads"]))
    with FeatureStore(args.features, expect=expected_attrs(params)) as store:
        ids, maps, pattrs = read_self_maps(args.pseudo)
        check_provenance(args.pseudo, pattrs, store.attrs)
        if bool(pattrs.get("center_keys", False)) != pcfg["center_keys"]:
            raise FscsError(f"{args.pseudo}: made with other pseudo.center_keys; re-run `dvc repro pseudo`")
        if list(ids) != list(store.image_ids) or tuple(maps.shape[2:]) != store.grid:
            raise FscsError(
                f"{args.pseudo}: image list or grid differs from {args.features}; re-run `dvc repro pseudo`"
            )
        cfg["in_channels"] = int(maps.shape[1])
        self_maps = {i: maps[r].astype(np.float32) for r, i in enumerate(ids)}
        labels = train_images(index, folds, store, args.index)
        stuff = stuff_ids(pcfg["stuff_classes"], folds, args.folds)
        data = Data(store, index, folds, self_maps, labels, pcfg["center_keys"], stuff)
        results = {}
        for fraction in mixed["sweep"]:
            print(f"enhancer: fraction {fraction}", file=sys.stderr)
            results[fraction] = run_fraction(data, fraction, mixed, cfg, pcfg)
        main_run = results[mixed["fraction"]]
        models = main_run["models"]
        enhanced = {name: enhance(m, maps.astype(np.float32)) for name, m in models.items()}
        prov = provenance(store.attrs)

    config = {
        **{k: cfg[k] for k in DEFAULT_CONFIG},
        "inputs": cfg["inputs"],
        "pairs_per_label": cfg["pairs_per_label"],
        "per_fold": bool(cfg["per_fold"]),
        "names": sorted(models),
        "fraction": mixed["fraction"],
        "mixed_seed": mixed["seed"],
        "labelled": len(main_run["labelled"]),
        "grid": list(data.grid),
        **{f"store_{k}": v for k, v in prov.items()},
    }
    report = {
        "fraction": mixed["fraction"],
        "seed": mixed["seed"],
        "per_fold": bool(cfg["per_fold"]),
        "inputs": cfg["inputs"],
        "loss": cfg["loss"],
        "steps": cfg["steps"],
        "threshold": {"raw": pcfg["cst_threshold"], "enhanced": {k: m.threshold for k, m in models.items()}},
        "void": "ignore",
        **main_run["numbers"],
        "sweep": [{"fraction": f, **results[f]["numbers"]} for f in mixed["sweep"]],
        "loss_history": {k: [round(v, 4) for v in h] for k, h in main_run["history"].items()},
    }
    report["sweep"] = [{k: v for k, v in r.items() if k != "folds"} for r in report["sweep"]]
    fig_dir = Path(args.figures)
    fig_dir.mkdir(parents=True, exist_ok=True)
    report["figure_images"] = figure(
        data,
        models,
        main_run["labelled"],
        fig_dir / "pseudo_labels.png",
        int(cfg["figures"]),
        pcfg["cst_threshold"],
    )
    with atomic_path(args.model) as tmp:
        save_enhancer(tmp, models, config)
    with atomic_path(args.out) as tmp:
        write_enhanced(tmp, ids, enhanced, main_run["labelled"], {**config, "content": "enhanced self maps"})
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
