"""Pooled IoU of thresholded foreground maps against binary targets, per key and threshold (void ignored).

Used to measure pseudo-labels (`fscs.pseudo.quality`, `fscs.pseudo.enhancer_study`) and to calibrate the
enhancer's mask threshold (`fscs.pseudo.enhancer`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class IoUCounter:
    """Intersection / union counts of thresholded maps against binary targets, per key and threshold.

    ``add(key, fg, target, valid)``: ``fg`` (h, w) float map at the target's size, ``target`` bool (h, w),
    ``valid`` bool (h, w) (False on void). IoU of a key = sum of intersections / sum of unions (x 100).
    """

    def __init__(self, thresholds: list[float]) -> None:
        self.thresholds = [float(t) for t in thresholds]
        self._t = np.asarray(self.thresholds, dtype=np.float32)[:, None, None]
        self.inter: dict[Any, np.ndarray] = {}
        self.union: dict[Any, np.ndarray] = {}

    def add(self, key: Any, fg: np.ndarray, target: np.ndarray, valid: np.ndarray) -> None:
        pred = fg[None] >= self._t
        tgt = target & valid
        inter = (pred & tgt[None]).sum(axis=(1, 2))
        union = ((pred & valid[None]) | tgt[None]).sum(axis=(1, 2))
        if key not in self.inter:
            self.inter[key] = np.zeros(len(self.thresholds), np.int64)
            self.union[key] = np.zeros(len(self.thresholds), np.int64)
        self.inter[key] += inter
        self.union[key] += union

    def iou(self, key: Any, t: int = 0) -> float | None:
        """IoU (%) of ``key`` at threshold index ``t``; None when the key never had a union."""
        if key not in self.union or self.union[key][t] == 0:
            return None
        return 100.0 * float(self.inter[key][t]) / float(self.union[key][t])

    def per_class(self, t: int = 0) -> dict[str, float]:
        """{key: IoU (%) rounded to 2 places} at threshold index ``t``, keys that had a union only."""
        return {str(k): round(v, 2) for k in sorted(self.union, key=str) if (v := self.iou(k, t)) is not None}

    def miou(self, t: int = 0) -> float:
        """Mean IoU (%) over the keys at threshold index ``t``, rounded to 2 places; NaN without keys."""
        vals = [self.iou(k, t) for k in self.union]
        vals = [v for v in vals if v is not None]
        return round(float(np.mean(vals)), 2) if vals else float("nan")
