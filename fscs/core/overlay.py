"""Label overlays and figure grids (scikit-image + matplotlib), reusable by any stage or the report.

``overlay`` paints a class-index map over an RGB image with a fixed colour per class id (0 = background is
not painted, 255 = void is painted white) and draws the label boundaries; ``save_grid`` lays out rows of
images (e.g. image | GT | pseudo-label | enhanced) with column titles into one PNG, written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fscs.core.errors import FscsError
from fscs.core.io import atomic_path
from fscs.core.resample import nearest
from fscs.data.images import VOID


def palette(class_id: int) -> tuple[float, float, float]:
    """A fixed RGB colour in [0, 1] per class id (the PASCAL VOC bit-interleaved palette; void white)."""
    if class_id == VOID:
        return (1.0, 1.0, 1.0)
    r = g = b = 0
    c = int(class_id)
    for shift in range(8):
        r |= ((c >> 0) & 1) << (7 - shift)
        g |= ((c >> 1) & 1) << (7 - shift)
        b |= ((c >> 2) & 1) << (7 - shift)
        c >>= 3
    return (r / 255.0, g / 255.0, b / 255.0)


def overlay(image_rgb: np.ndarray, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Paint ``label_map`` (h, w) ints (0 background, 255 void) over ``image_rgb`` (h, w, 3) -> uint8 RGB.

    A bool map is treated as class 1. The image is resized (nearest) to the label map's size if they differ.
    """
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    img = np.asarray(image_rgb)
    labels = np.asarray(label_map)
    if img.ndim != 3 or img.shape[2] != 3:
        raise FscsError(f"overlay: image must be (h, w, 3) RGB, got shape {img.shape}")
    if labels.ndim != 2:
        raise FscsError(f"overlay: label map must be (h, w), got shape {labels.shape}")
    labels = labels.astype(np.int64)
    if img.shape[:2] != labels.shape:
        img = nearest(img, labels.shape)
    img = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else np.clip(img.astype(np.float64), 0, 1)
    present = [int(c) for c in np.unique(labels) if c != 0]
    if present:
        colors = [palette(c) for c in present]
        out = label2rgb(labels, img, colors=colors, alpha=alpha, bg_label=0, bg_color=None, saturation=1)
        edges = find_boundaries(labels, mode="inner")
        out[edges] = [1.0, 1.0, 0.0]
    else:
        out = img
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def save_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    cell_inches: float = 2.2,
    dpi: int = 100,
) -> None:
    """Save rows of RGB images (uint8 (h, w, 3) or 2-d grey) as one PNG grid with column titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows or not all(len(r) == len(rows[0]) for r in rows) or not rows[0]:
        raise FscsError(f"{path}: save_grid needs a non-empty rectangular list of rows")
    n_rows, n_cols = len(rows), len(rows[0])
    if titles is not None and len(titles) != n_cols:
        raise FscsError(f"{path}: {len(titles)} titles for {n_cols} columns")
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(cell_inches * n_cols, cell_inches * 0.75 * n_rows), squeeze=False
    )
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            ax = axes[i][j]
            arr = np.asarray(img)
            ax.imshow(
                arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=255 if arr.dtype == np.uint8 else 1
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and titles is not None:
                ax.set_title(titles[j], fontsize=9)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
