"""The enhancer stage's figure: image | GT | raw pseudo-label | enhanced pseudo-label for held-out images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fscs.core.overlay import overlay, save_grid
from fscs.core.resample import bilinear
from fscs.data.folds import fold_classes
from fscs.data.images import load_rgb
from fscs.pseudo.attention import cst_foreground
from fscs.pseudo.enhancer import Enhancer, enhance
from fscs.pseudo.enhancer_study import StudyData


def pseudo_label_figure(
    data: StudyData,
    models: dict[str, Enhancer],
    labelled: list[str],
    path: Path,
    count: int,
    threshold: float,
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
            trained = (f"fold{f}" for f in data.fold_ids if c in fold_classes(data.folds, f, "train"))
            name = next(trained, first)
        raw = bilinear(cst_foreground(data.self_cos[i]), gt.shape) >= threshold
        enh = bilinear(enhance(models[name], data.self_cos[i][None])[0], gt.shape) >= models[name].threshold
        rows.append([img, overlay(img, gt, 0.5), overlay(img, raw * c, 0.5), overlay(img, enh * c, 0.5)])
        names.append(f"{i} ({data.folds['classes'].get(str(c), c)}, {name})")
    save_grid(
        rows,
        path,
        titles=["image", "GT", f"raw pseudo-label (>= {threshold})", "enhanced (calibrated threshold)"],
        row_labels=names,
    )
    return picks
