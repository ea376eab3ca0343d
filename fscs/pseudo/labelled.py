"""The labelled subset of the mixed setting: which training images keep their GT masks.

Drawn once per (fraction, seed) from the TRAINING split, stratified so that every class in ``classes`` has at
least one labelled image: classes are visited from the rarest up and, when none of the images chosen so far
contains the class, one random image containing it is added; the subset is then filled with random images up
to ``round(fraction * n)``. When covering every class needs more images than the fraction allows (1% of
MSRC's 355 training images is 4 images for 21 classes), the subset is larger than the fraction: the report
gives the real count. Nested fractions are not guaranteed (each fraction is its own draw).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fscs.core.errors import FscsError


def select_labelled(
    index: pd.DataFrame, classes: list[int], fraction: float, seed: int, split: str | None = None
) -> list[str]:
    """Seeded stratified choice of labelled image ids (sorted) from ``index`` (rows of ``split`` if given).

    index: image index (indexed by image_id, with a ``classes`` column of class-id lists).
    classes: the classes that must each appear in at least one labelled image (those with any image).
    """
    if not 0.0 < fraction <= 1.0:
        raise FscsError(f"mixed fraction must be in (0, 1], got {fraction}")
    rows = index if split is None else index[index["split"] == split]
    if len(rows) == 0:
        raise FscsError(f"labelled subset: no images in split {split!r}")
    ids = sorted(str(i) for i in rows.index)
    labels = {str(i): {int(c) for c in cs} for i, cs in zip(rows.index, rows["classes"], strict=True)}
    rng = np.random.default_rng(seed)
    holders = {int(c): [i for i in ids if int(c) in labels[i]] for c in classes}
    chosen: list[str] = []
    covered: set[int] = set()
    # rarest class first (ties by class id), so a rare class's image is not crowded out
    for c in sorted(holders, key=lambda c: (len(holders[c]), c)):
        if c in covered or not holders[c]:
            continue
        pick = holders[c][int(rng.integers(len(holders[c])))]
        chosen.append(pick)
        covered |= labels[pick]
    target = int(round(fraction * len(ids)))
    rest = [i for i in ids if i not in set(chosen)]
    if target > len(chosen) and rest:
        extra = rng.choice(len(rest), size=min(target - len(chosen), len(rest)), replace=False)
        chosen += [rest[int(j)] for j in extra]
    return sorted(chosen)
