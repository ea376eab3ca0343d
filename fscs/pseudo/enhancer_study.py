"""The mixed setting's enhancer study: draw the labelled subset, train the enhancer(s), measure the gain.

For each labelled fraction (``mixed.fraction`` and ``mixed.sweep``) a freshly drawn subset
(``fscs.pseudo.labelled``) and freshly trained enhancer(s) (``fscs.pseudo.enhancer``). Pseudo-label mIoU
before (raw ``cst`` maps at ``pseudo.cst_threshold``) and after (enhanced, at the enhancer's calibrated
threshold) on the training-split images OUTSIDE the labelled subset, for self maps (image's labels) and pair
maps (seeded (support, query, class) pairs as in `fscs.pseudo.quality`), void ignored, at original image size.
Per fold, mIoU is over the fold's training classes (the headline: what the fold's training uses), and
separately over its object / stuff training classes and its test classes (classes the enhancer never saw a
mask of). ``after_oracle`` (best grid threshold on the held-out GT) is a diagnostic only.

``per_fold``: one enhancer per fold, trained on masks of the fold's TRAINING classes only, so no mask of a
class a fold tests on is ever used; the test split is never used either way. Measured choices (per fold,
object targets, auto threshold, inputs, loss, steps): reports/CHOICES.md.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from fscs.config.params import Config
from fscs.core.errors import FscsError
from fscs.core.iou import IoUCounter
from fscs.core.lru import LRUCache
from fscs.core.provenance import check_derived
from fscs.core.resample import bilinear
from fscs.data.folds import fold_classes
from fscs.data.images import VOID, gt_mask
from fscs.features.store import FeatureStore
from fscs.pseudo.attention import cst_foreground, head_cosine, read_self_maps
from fscs.pseudo.enhancer import DEFAULT_CONFIG, binary_target, enhance, train_enhancer
from fscs.pseudo.labelled import select_labelled
from fscs.pseudo.quality import sample_pairs


def enhancer_config(config: Config) -> dict:
    """The validated ``enhancer`` section as a dict."""
    return config.enhancer.model_dump()


def mixed_config(config: Config) -> dict:
    """The validated ``mixed`` section as a dict; the sweep always includes the fraction, sorted."""
    m = config.mixed
    return {"fraction": m.fraction, "sweep": sorted(set(m.sweep) | {m.fraction}), "seed": m.seed}


class StudyData:
    """Everything the enhancer needs in memory: training-split labels, GT masks, per-head self maps."""

    def __init__(
        self,
        store: FeatureStore,
        index: pd.DataFrame,
        folds: dict,
        self_maps: dict[str, np.ndarray],
        labels: dict[str, list[int]],
        center: bool,
        stuff: set[int] | None = None,
    ) -> None:
        self.store, self.index, self.folds, self.center = store, index, folds, center
        self.stuff = set(stuff or ())
        self.labels: dict[str, list[int]] = labels
        self.self_cos = self_maps
        self.grid = store.grid
        self.gt = {i: gt_mask(index, i) for i in tqdm(sorted(labels), desc="GT", disable=None)}
        self.classes = sorted({c for cs in labels.values() for c in cs})
        self.fold_ids = sorted(folds["folds"], key=int)
        self._pair_cache = LRUCache()

    def pair_cos(self, support: str, query: str) -> np.ndarray:
        """Per-head cosine maps (H, gh, gw) of the support's CLS query with the query's keys; cached."""
        return self._pair_cache.get_or((support, query), lambda: self._pair_cos(support, query))

    def _pair_cos(self, support: str, query: str) -> np.ndarray:
        cos = head_cosine(self.store.cls_query(support), self.store.patch_keys(query), self.center)
        return cos.reshape(-1, *self.grid)


def training_set(
    data: StudyData, labelled: list[str], classes: set[int], cfg: dict, seed: int
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
    data: StudyData,
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
            self_up = bilinear(fgs[0], gt.shape)
            for c in data.labels[q]:
                out[name]["self"].add(c, self_up, gt == c, valid)
            for (_s, c), fg in zip(by_query.get(q, []), fgs[1:], strict=True):
                out[name]["pair"].add(c, bilinear(fg, gt.shape), gt == c, valid)
    return out


def _mean(counter: IoUCounter, classes: list[int], t: int = 0) -> float | None:
    vals = [counter.iou(c, t) for c in classes]
    vals = [v for v in vals if v is not None]
    return round(float(np.mean(vals)), 2) if vals else None


def run_fraction(
    data: StudyData, fraction: float, mixed: dict, cfg: dict, pcfg: dict, progress: bool = True
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
        {f"fold{f}": fold_classes(data.folds, f, "train") for f in data.fold_ids}
        if cfg["per_fold"]
        else {"all": list(data.classes)}
    )
    unseen = {f"fold{f}": fold_classes(data.folds, f, "test") for f in data.fold_ids if cfg["per_fold"]}
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


def load_checked_self_maps(
    path: str, store: FeatureStore, center: bool, features: str
) -> tuple[list[str], np.ndarray]:
    """(image ids, self maps) of the pseudo stage's file, refused unless made from this store (provenance,
    image list, grid) with the configured ``pseudo.center_keys``."""
    ids, maps, attrs = read_self_maps(path)
    check_derived(path, attrs, store.attrs)
    if bool(attrs.get("center_keys", False)) != center:
        raise FscsError(f"{path}: made with other pseudo.center_keys; re-run `dvc repro pseudo`")
    if list(ids) != list(store.image_ids) or tuple(maps.shape[2:]) != store.grid:
        raise FscsError(f"{path}: image list or grid differs from {features}; re-run `dvc repro pseudo`")
    return ids, maps


def checkpoint_config(
    cfg: dict, mixed: dict, models: dict, labelled: list[str], grid: tuple[int, int], prov: dict
) -> dict:
    """The ``config`` saved with the enhancer checkpoint and as the enhanced file's attributes."""
    return {
        **{k: cfg[k] for k in DEFAULT_CONFIG},
        "inputs": cfg["inputs"],
        "pairs_per_label": cfg["pairs_per_label"],
        "per_fold": bool(cfg["per_fold"]),
        "names": sorted(models),
        "fraction": mixed["fraction"],
        "mixed_seed": mixed["seed"],
        "labelled": len(labelled),
        "grid": list(grid),
        **{f"store_{k}": v for k, v in prov.items()},
    }


def study_report(cfg: dict, pcfg: dict, mixed: dict, results: dict[float, dict]) -> dict:
    """The stage's JSON report: the main fraction's numbers and loss history, and every fraction's numbers."""
    main_run = results[mixed["fraction"]]
    models = main_run["models"]
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
    return report
