"""FS-CS metrics: exact ratio (ER) for classification, accumulated class-wise IoU and FB-IoU for segmentation.

Conventions (METHOD.md section 6):
- ER: an episode is correct only if all N presence predictions equal the labels.
- mIoU: for every episode, the intersection and union of each episode label (background, 1..N) are computed
  at the query's original resolution, mapped to absolute class ids and *accumulated* over all episodes;
  IoU_c = sum I_c / sum U_c. mIoU is the mean of IoU_c over the fold's test classes (background excluded).
  A class whose accumulated union is zero (it never appeared in any episode's prediction or ground truth) has
  no defined IoU: it is left out of the mean and reported as None by ``per_class()``.
- FB-IoU: foreground (any of the episode's classes) vs background, intersection and union accumulated over
  episodes; FB-IoU = (IoU_fg + IoU_bg) / 2. Foreground pixels count as intersecting whatever class they got.
- Void pixels (255): ``void="ignore"`` drops them from every count (FS-S convention, the default);
  ``void="background"`` counts them as background (the reference CST/iFSL meter).

Episode ground truth: a query pixel of class c, for c among the episode's support classes, is label c; every
other non-void pixel is background (classes not in the episode are background); void stays void.
All scores are percentages in [0, 100].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from fscs.data.images import VOID

VOID_MODES = ("ignore", "background")


def check_void(void: str) -> str:
    """Validate a void mode name."""
    if void not in VOID_MODES:
        raise ValueError(f"void must be one of {VOID_MODES}, got {void!r}")
    return void


def episode_gt(gt_abs: np.ndarray, episode_classes: Sequence[int], void: str = "ignore") -> np.ndarray:
    """Map an absolute-id mask to episode labels: 0 background, i for episode_classes[i-1], 255 void.

    With ``void="background"`` void pixels become background (label 0).
    """
    check_void(void)
    gt_abs = np.asarray(gt_abs)
    out = np.zeros(gt_abs.shape, dtype=np.uint8)
    for i, c in enumerate(episode_classes, start=1):
        out[gt_abs == c] = i
    if void == "ignore":
        out[gt_abs == VOID] = VOID
    return out


def _ratio(inter: float, union: float) -> float | None:
    return None if union <= 0 else 100.0 * inter / union


class SegMeter:
    """Accumulates per-class intersections and unions over episodes.

    ``class_ids``: the classes mIoU averages over (the fold's test classes). Episodes may contain other
    classes; they are accumulated (see ``per_class(all_classes=True)``) but do not enter mIoU.
    """

    def __init__(self, class_ids: Iterable[int], void: str = "ignore"):
        self.class_ids = [int(c) for c in class_ids]
        self.void = check_void(void)
        self.inter: dict[int, int] = {}
        self.union: dict[int, int] = {}
        self.fb_inter = np.zeros(2, dtype=np.int64)  # [background, foreground]
        self.fb_union = np.zeros(2, dtype=np.int64)
        self.episodes = 0

    def update(self, pred: np.ndarray, gt_abs: np.ndarray, episode_classes: Sequence[int]) -> None:
        """Add one episode.

        pred: (H, W) episode labels, 0 background and i in 1..N for ``episode_classes[i-1]``.
        gt_abs: (H, W) the query's mask with absolute class ids (0 background, 255 void).
        """
        pred = np.asarray(pred)
        gt_abs = np.asarray(gt_abs)
        if pred.shape != gt_abs.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt_abs.shape}")
        n = len(episode_classes)
        if len(set(int(c) for c in episode_classes)) != n:
            raise ValueError(f"episode classes must be distinct, got {list(episode_classes)}")
        if pred.size and (pred.min() < 0 or pred.max() > n):
            raise ValueError(f"prediction labels must lie in 0..{n}")
        gt = episode_gt(gt_abs, episode_classes, self.void)
        valid = gt != VOID
        p = pred[valid].astype(np.int64)
        g = gt[valid].astype(np.int64)
        # joint histogram of (gt, pred) labels over valid pixels
        conf = np.bincount(g * (n + 1) + p, minlength=(n + 1) ** 2).reshape(n + 1, n + 1)
        inter = np.diag(conf)
        union = conf.sum(0) + conf.sum(1) - inter
        labels = [0] + [int(c) for c in episode_classes]
        for lab, i, u in zip(labels, inter, union, strict=True):
            self.inter[lab] = self.inter.get(lab, 0) + int(i)
            self.union[lab] = self.union.get(lab, 0) + int(u)
        bg_i = int(conf[0, 0])
        fg_i = int(conf[1:, 1:].sum())
        pb, gb = int(conf[:, 0].sum()), int(conf[0, :].sum())
        total = int(conf.sum())
        self.fb_inter += [bg_i, fg_i]
        self.fb_union += [pb + gb - bg_i, (total - pb) + (total - gb) - fg_i]
        self.episodes += 1

    def iou(self, class_id: int) -> float | None:
        """Accumulated IoU of one class (0 = background) in percent, None if its union is zero."""
        return _ratio(self.inter.get(class_id, 0), self.union.get(class_id, 0))

    def per_class(self, all_classes: bool = False) -> dict[int, float | None]:
        """IoU per class of ``class_ids`` (or every class seen, background included, with all_classes)."""
        ids = sorted(self.union) if all_classes else self.class_ids
        return {c: self.iou(c) for c in ids}

    def miou(self) -> float:
        """Mean accumulated IoU over ``class_ids`` with a non-zero union (nan if there is none)."""
        vals = [v for v in self.per_class().values() if v is not None]
        return float(np.mean(vals)) if vals else float("nan")

    def fbiou(self) -> float:
        """Mean of accumulated background and foreground IoU (components with zero union left out)."""
        vals = [_ratio(i, u) for i, u in zip(self.fb_inter, self.fb_union, strict=True)]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else float("nan")


class ClsMeter:
    """Exact ratio: the share of episodes whose N presence predictions are all right."""

    def __init__(self) -> None:
        self.correct = 0
        self.episodes = 0

    def update(self, pred_present: Sequence[bool] | np.ndarray, labels: Sequence[int] | np.ndarray) -> None:
        """Add one episode: predicted presence flags (N,) and labels (N,) (1 = present)."""
        p = np.asarray(pred_present).astype(bool).ravel()
        y = np.asarray(labels).astype(bool).ravel()
        if p.shape != y.shape:
            raise ValueError(f"{p.size} presence predictions for {y.size} labels")
        self.correct += int(np.array_equal(p, y))
        self.episodes += 1

    def er(self) -> float:
        """Exact ratio in percent (nan before any update)."""
        return 100.0 * self.correct / self.episodes if self.episodes else float("nan")


class ThresholdSweep:
    """Accumulated class-wise IoU for many foreground thresholds at once (calibration of baselines).

    For each episode, a score map per pixel (the best class's foreground value ``top``) and its class
    (``arg``, episode labels 1..N) are given; the prediction at threshold t is ``arg`` where ``top >= t``,
    background elsewhere, exactly as `SegMeter` would score ``np.where(top >= t, arg, 0)``.
    """

    def __init__(self, class_ids: Iterable[int], thresholds: Sequence[float], void: str = "ignore"):
        self.class_ids = [int(c) for c in class_ids]
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        if self.thresholds.ndim != 1 or np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("thresholds must be a strictly increasing 1-D sequence")
        self.void = check_void(void)
        self.inter: dict[int, np.ndarray] = {}
        self.union: dict[int, np.ndarray] = {}

    def _add(self, label: int, inter: np.ndarray, union: np.ndarray) -> None:
        if label not in self.inter:
            self.inter[label] = np.zeros(self.thresholds.size, dtype=np.int64)
            self.union[label] = np.zeros(self.thresholds.size, dtype=np.int64)
        self.inter[label] += inter
        self.union[label] += union

    def update(
        self, top: np.ndarray, arg: np.ndarray, gt_abs: np.ndarray, episode_classes: Sequence[int]
    ) -> None:
        top, arg, gt_abs = np.asarray(top), np.asarray(arg), np.asarray(gt_abs)
        if not (top.shape == arg.shape == gt_abs.shape):
            raise ValueError(f"shapes differ: top {top.shape}, arg {arg.shape}, gt {gt_abs.shape}")
        gt = episode_gt(gt_abs, episode_classes, self.void)
        valid = gt != VOID
        g, a = gt[valid].astype(np.int64), arg[valid].astype(np.int64)
        t = self.thresholds.size
        # bin b = number of thresholds <= value: a value counts as foreground at threshold j iff its bin > j
        bins = np.searchsorted(self.thresholds, top[valid].astype(np.float64), side="right")

        def n_ge(sel: np.ndarray) -> np.ndarray:  # per threshold: how many selected values are >= it
            counts = np.bincount(bins[sel], minlength=t + 1)
            return int(counts.sum()) - np.cumsum(counts)[:t]

        everything = np.ones(bins.size, dtype=bool)
        below = bins.size - n_ge(everything)
        bg_gt = g == 0
        inter0 = int(bg_gt.sum()) - n_ge(bg_gt)
        self._add(0, inter0, int(bg_gt.sum()) + below - inter0)
        for i, c in enumerate(episode_classes, start=1):
            pred_i = n_ge(a == i)
            inter_i = n_ge((a == i) & (g == i))
            self._add(int(c), inter_i, int((g == i).sum()) + pred_i - inter_i)

    def miou(self) -> np.ndarray:
        """mIoU (percent) per threshold over ``class_ids`` with non-zero union; nan where none has."""
        out = np.full(self.thresholds.size, np.nan)
        num = np.zeros(self.thresholds.size)
        cnt = np.zeros(self.thresholds.size)
        for c in self.class_ids:
            if c in self.union:
                u = self.union[c]
                ok = u > 0
                num[ok] += 100.0 * self.inter[c][ok] / u[ok]
                cnt[ok] += 1
        has = cnt > 0
        out[has] = num[has] / cnt[has]
        return out
