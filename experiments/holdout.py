"""Held-out classes: an inner split of a fold's training classes, so a learner choice is ranked by how the
model does on classes it never trained on, as the test episodes rank it, without reading the test split.

The pipeline's validation episodes use the fold's training classes (the classes the model trains on);
reports/LEARNER.md ("train.model.prior") shows that they can rank a choice the wrong way round for novel
classes.
Here every ``every``-th training class (ascending ids, starting at position ``fold % every``) is held out
and 1-way 1-shot episodes of the held-out classes are drawn from the training split. Two uses:

- `holdout_cell`: train on the other classes, select and calibrate on the held-out episodes themselves;
- `inner_split` + `score_inner` (the "inner test"): the outer protocol one level down. Train on the other
  classes, select and calibrate on the pipeline's validation episodes of those classes only, then score
  the chosen checkpoint once on the held-out episodes, as evaluation scores the test episodes.

Held-out classes may still appear, unlabelled, in the background of training images, as test classes do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from fscs.core.errors import FscsError
from fscs.data.episodes import EPISODE_COLUMNS, EpisodeSampler
from fscs.evaluation.baselines import STATS, presence_score
from fscs.learn.calibration import apply_offset, best_threshold
from fscs.learn.cell import Cell
from fscs.learn.train import pixel_signals


def held_out_classes(train_classes: list[int], fold: int, every: int = 4) -> list[int]:
    """Every ``every``-th of the sorted training classes, starting at position ``fold % every``."""
    if every < 2:
        raise FscsError(f"holdout: every must be >= 2 (one class in {every} held out), got {every}")
    return sorted(train_classes)[fold % every :: every]


def kept_classes(train_classes: list[int], fold: int, every: int = 4) -> list[int]:
    """The training classes left for training once `held_out_classes` are taken out (original order)."""
    held = set(held_out_classes(train_classes, fold, every))
    return [c for c in train_classes if c not in held]


def draw_held_out(
    index: pd.DataFrame, train_classes: list[int], fold: int, split: str, every: int, episodes: int, seed: int
) -> pd.DataFrame:
    """``episodes`` 1-way 1-shot episodes of the fold's held-out classes from ``split`` (episode i from
    ``seed + i``, as the prepare stage draws)."""
    held = held_out_classes(train_classes, fold, every)
    sampler = EpisodeSampler(index, held, split, way=1, shot=1, too_few="drop")
    if not sampler.classes:
        raise FscsError(f"fold {fold}: no held-out class has 2+ '{split}' images")
    rows = [sampler.episode(seed + i).row(fold, i) for i in range(int(episodes))]
    return pd.DataFrame(rows, columns=list(EPISODE_COLUMNS))


def held_out_episodes(cell: Cell, every: int = 4, episodes: int = 200, seed: int = 0) -> pd.DataFrame:
    """`draw_held_out` for a cell (its index, training classes, fold and training split)."""
    return draw_held_out(cell.index, cell.train_classes, cell.fold, cell.split, every, episodes, seed)


def episode_classes(episodes: pd.DataFrame) -> list[int]:
    return sorted({int(c) for cs in episodes["support_classes"] for c in cs})


def holdout_cell(cell: Cell, every: int = 4, episodes: int = 200, seed: int = 0) -> Cell:
    """The cell trained on its training classes minus the held-out ones and validated (selection and
    calibration) on episodes of the held-out classes."""
    val = held_out_episodes(cell, every, episodes, seed)
    kept = kept_classes(cell.train_classes, cell.fold, every)
    return dataclasses.replace(
        cell, train_classes=kept, val=val, val_classes=episode_classes(val), val_kshot=None
    )


def inner_split(cell: Cell, every: int = 4, episodes: int = 200, seed: int = 0) -> tuple[Cell, pd.DataFrame]:
    """(the cell trained on the kept classes and validated on the pipeline's validation episodes whose
    classes are all kept, the held-out episodes to score its chosen checkpoint on)."""
    test = held_out_episodes(cell, every, episodes, seed)
    kept = kept_classes(cell.train_classes, cell.fold, every)

    def of_kept(rows: pd.DataFrame | None) -> pd.DataFrame | None:
        return None if rows is None else rows[rows["support_classes"].map(set(kept).issuperset)]

    val, kshot = of_kept(cell.val).reset_index(drop=True), of_kept(cell.val_kshot)
    return dataclasses.replace(cell, train_classes=kept, val=val, val_kshot=kshot), test


#: log-odds offsets of the calibrated thresholds that `score_inner` also scores (novel-class calibration)
OFFSETS = (-1.0, -0.5, 0.5, 1.0, 1.5, 2.0, 3.0)


def score_inner(
    cell: Cell, model: Any, episodes: pd.DataFrame, offsets: tuple[float, ...] = OFFSETS
) -> dict[str, float]:
    """ER / mIoU of a trained model (its calibrated thresholds) on held-out episodes, as evaluation scores,
    and ``inner_er@D`` / ``inner_miou@D`` with both thresholds moved by D in log-odds: does a threshold
    chosen on seen classes need an offset for novel ones? (ER reads the presence threshold only, mIoU the
    foreground threshold only.)"""
    from fscs.evaluation.episodes import run_episodes
    from fscs.learn.predictor import CSTPredictor

    t = cell.targets
    predictor = CSTPredictor(model, cell.tokens, t.test_support_mask, t.test_mask_depends_on_class)
    classes = episode_classes(episodes)
    r = run_episodes(episodes, predictor, cell.index, classes, void=cell.void, progress=False)["1way1shot"]
    held_out = presence_scores(predictor, episodes)
    out = {"inner_er": r["er"], "inner_miou": r["miou"], **presence_diagnostics(*held_out)}
    out.update(presence_rules(presence_scores(predictor, cell.val), held_out))
    cfg = model.config
    chosen = (cfg.presence_threshold, cfg.fg_threshold)
    try:  # the thresholds moved by each offset; the predictor's pair cache makes each pass cheap
        for delta in offsets:
            cfg.presence_threshold, cfg.fg_threshold = (apply_offset(t, delta) for t in chosen)
            r = run_episodes(episodes, predictor, cell.index, classes, void=cell.void, progress=False)
            out[f"inner_er@{delta:+g}"] = r["1way1shot"]["er"]
            out[f"inner_miou@{delta:+g}"] = r["1way1shot"]["miou"]
    finally:
        cfg.presence_threshold, cfg.fg_threshold = chosen
    return out


def presence_diagnostics(scores: dict[str, np.ndarray], lab: np.ndarray) -> dict[str, float]:
    """Does the presence classifier rank held-out classes (AUC) and is its calibrated threshold right for
    them? From `presence_scores` of the held-out episodes: presence AUC, the fraction called present, and
    the ER the best threshold on these episodes would give (an oracle bound, for diagnosis only: it reads
    the held-out labels)."""
    prob = scores["head"]
    auc = pixel_signals(prob, lab)["auc"]  # the curves' threshold-free AUC, here over episodes
    oracle = best_threshold(prob, lab)[1]
    return {
        "inner_presence_auc": round(float(auc), 4),
        "inner_present_frac": round(float(np.mean(prob >= 0.5)), 4),
        "inner_er_oracle": round(100.0 * oracle, 2),
    }


def presence_scores(predictor: Any, episodes: pd.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per 1-way episode: presence scores by rule (``head``: the classification head's probability;
    ``fg_<stat>``: a statistic of the foreground probability map, as the baselines score presence), and the
    presence labels."""
    scores: dict[str, list[float]] = {"head": [], **{f"fg_{stat}": [] for stat in STATS}}
    labels = []
    for row in episodes.itertuples(index=False):
        c, shots = int(row.support_classes[0]), list(row.support_ids[0])
        p, fg = predictor.predict(str(row.query_id), [c], [shots])
        scores["head"].append(float(p[0]))
        for stat in STATS:
            scores[f"fg_{stat}"].append(presence_score(fg[0], stat))
        labels.append(bool(row.labels[0]))
    return {k: np.asarray(v) for k, v in scores.items()}, np.asarray(labels)


def presence_rules(
    val: tuple[dict[str, np.ndarray], np.ndarray], held_out: tuple[dict[str, np.ndarray], np.ndarray]
) -> dict[str, float]:
    """ER on the held-out episodes of each presence rule (`presence_scores` of the validation and of the
    held-out episodes), its threshold chosen on the validation episodes (seen classes) as the baselines
    choose theirs: can the model's own foreground map decide presence better than its classification head?"""
    (val_scores, val_labels), (test_scores, test_labels) = val, held_out
    out = {}
    for rule, scores in val_scores.items():
        t, val_acc = best_threshold(scores, val_labels)
        out[f"val_er_{rule}"] = round(100.0 * val_acc, 2)
        out[f"inner_er_{rule}"] = round(100.0 * float(np.mean((test_scores[rule] > t) == test_labels)), 2)
    return out
