"""Decision thresholds of a trained CST model, chosen on validation episodes only.

A model can rank pixels and episodes well (high AUC) yet sit below 0.5 everywhere: early in training, or
when foreground is rare (21% of the pixels of MSRC's training episodes). The fixed 0.5 rule then scores
mIoU 0 and ER at the base rate, which hides what was learned and makes checkpoint selection blind.
`calibrate` picks the presence threshold that maximises validation ER and the foreground threshold that
maximises validation mIoU; `shift` moves probabilities so those thresholds fall on 0.5, so every consumer of
a predictor (evaluation, `fscs predict`) keeps the 0.5 rule unchanged.

The presence threshold is searched exactly (`best_threshold`: midpoints between the validation scores, as the
baselines choose theirs). The classification head of an image-level model can put every episode's
probability inside a band narrower than a 0.05 grid step around 0.5: on held-out training classes the grid
left validation ER at the base rate (52%) in every epoch where the exact threshold reached 71-73%
(reports/LEARNER.md, "train.calibrate"). The foreground threshold keeps the grid: mIoU is summed over many
pixels.

mIoU is scored as `fscs.evaluation.episodes` scores a CST model: on its foreground maps, whatever the presence
decision (METHOD.md §5: the pixel labels come from the foreground maps alone). Emptying the masks of
episodes predicted absent here would choose thresholds and checkpoints for a gated mIoU that evaluation never
computes; with a classifier at chance on a class that selects the all-absent threshold and scores mIoU 0.

mIoU here is accumulated per class over the episodes at the mask size the model was trained at (a close,
cheap proxy of `fscs.evaluation.episodes`'s full-resolution score, re-computed for every candidate threshold).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fscs.core.errors import FscsError
from fscs.data.images import VOID

#: candidate foreground thresholds
GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))


def log_odds(p: np.ndarray | float, eps: float = 1e-6) -> np.ndarray:
    """log(p / (1 - p)) in float64, p clipped to [eps, 1 - eps] so 0 and 1 stay finite."""
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(q / (1 - q))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def shift(p: np.ndarray, threshold: float) -> np.ndarray:
    """Probabilities re-centred so that ``threshold`` maps to 0.5 (a shift of the log-odds)."""
    if threshold == 0.5:
        return p
    return sigmoid(log_odds(p) - log_odds(float(threshold)))


def apply_offset(threshold: float, delta: float) -> float:
    """``threshold`` moved by ``delta`` in log-odds: delta > 0 asks for more evidence before calling a class
    present (or a pixel foreground)."""
    if delta == 0:
        return float(threshold)
    return float(sigmoid(log_odds(float(threshold)) + float(delta)))


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Threshold t maximising accuracy of ``score > t`` -> (t, accuracy); t is a midpoint between scores.

    Ties go to the lowest threshold. Deterministic.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if s.size == 0:
        raise FscsError("calibration: no validation scores to choose a threshold on")
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    uniq = np.unique(s)
    cands = np.concatenate([[uniq[0] - 1e-6], (uniq[:-1] + uniq[1:]) / 2, [uniq[-1] + 1e-6]])
    # accuracy of score > t: negatives at or below t are right, positives above t are right
    below = np.searchsorted(s, cands, side="right")  # number of scores <= t
    neg_below = np.concatenate([[0], np.cumsum(~y)])[below]
    pos_above = y.sum() - np.concatenate([[0], np.cumsum(y)])[below]
    acc = (neg_below + pos_above) / s.size
    i = int(np.argmax(acc))
    return float(cands[i]), float(acc[i])


@dataclass
class Records:
    """Per-episode validation outputs of 1-way episodes: class, presence label and probability, foreground
    probability map and ground truth (0/1, 255 ignored) at one size."""

    classes: np.ndarray  # (E,)
    labels: np.ndarray  # (E,) bool
    presence: np.ndarray  # (E,)
    fg: np.ndarray  # (E, h, w)
    gt: np.ndarray  # (E, h, w) uint8


def episode_scores(
    r: Records, presence_t: float, fg_t: float, fold_classes: list[int]
) -> tuple[float, float]:
    """(ER %, mIoU %) of the thresholds on the records; mIoU over the fold classes seen, of the foreground
    maps whatever the presence decision (as `fscs.evaluation.episodes` scores them)."""
    present = r.presence >= presence_t
    er = 100.0 * float(np.mean(present == r.labels))
    valid = r.gt != VOID
    pred = (r.fg >= fg_t) & valid
    truth = (r.gt == 1) & valid
    inter = (pred & truth).sum(axis=(1, 2))
    union = (pred | truth).sum(axis=(1, 2))
    ious = []
    for c in fold_classes:
        sel = r.classes == c
        u = union[sel].sum()
        if u > 0:
            ious.append(inter[sel].sum() / u)
    return er, 100.0 * float(np.mean(ious)) if ious else 0.0


def calibrate(r: Records, fold_classes: list[int]) -> dict[str, float]:
    """Presence threshold with the best ER (exact search, ties: the lowest) and foreground threshold on
    `GRID` with the best mIoU (ties: nearest to 0.5). Returns the thresholds and the ER / mIoU they give on
    the records."""

    def pick(scores: dict[float, float]) -> float:
        return max(scores, key=lambda t: (round(scores[t], 6), -abs(t - 0.5)))

    tp = best_threshold(r.presence, r.labels)[0]
    tf = pick({t: episode_scores(r, tp, t, fold_classes)[1] for t in GRID})
    er, miou = episode_scores(r, tp, tf, fold_classes)
    return {"presence_threshold": tp, "fg_threshold": tf, "er": round(er, 4), "miou": round(miou, 4)}
