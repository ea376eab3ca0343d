"""Decision thresholds chosen on validation records (fscs.learn.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from fscs.learn.calibration import Records, apply_offset, calibrate, episode_scores, shift


def shy_records(seed: int = 0) -> Records:
    """An under-confident but well-ranked model: foreground at ~0.3, background at ~0.1, presence ~0.4 vs
    ~0.2: every probability below 0.5."""
    rng = np.random.default_rng(seed)
    n, s = 40, 16
    labels = np.arange(n) % 2 == 0
    gt = np.zeros((n, s, s), np.uint8)
    gt[labels, 4:12, 4:12] = 1
    gt[:, 0, :] = 255
    fg = np.where(gt == 1, 0.3, 0.1) + rng.normal(0, 0.02, gt.shape)
    presence = np.where(labels, 0.4, 0.2) + rng.normal(0, 0.02, n)
    return Records(np.arange(n) % 4 + 1, labels, presence, fg, gt)


def test_calibration_recovers_what_the_half_threshold_hides():
    r = shy_records()
    er, miou = episode_scores(r, 0.5, 0.5, [1, 2, 3, 4])
    assert er == 50.0 and miou == 0.0  # the 0.5 rule: base-rate ER, no foreground at all
    cal = calibrate(r, [1, 2, 3, 4])
    assert 0.2 < cal["presence_threshold"] < 0.4 and 0.1 < cal["fg_threshold"] < 0.3
    assert cal["er"] == 100.0 and cal["miou"] > 95.0


def test_masks_are_scored_whatever_the_presence_decision_as_evaluation_scores_them():
    from fscs.evaluation.episodes import decide

    r = shy_records()
    r.presence[:] = 0.01  # a classifier that calls every class absent
    er, miou = episode_scores(r, 0.5, 0.2, [1, 2, 3, 4])
    assert er == 50.0 and miou > 95.0  # the foreground maps are still right, and scored
    present, labels = decide(np.array([0.01]), r.fg[:1] + 0.3, r.fg.shape[1:])
    assert not present[0] and (labels[4:12, 4:12] == 1).all()  # evaluation keeps the mask of an absent class
    cal = calibrate(r, [1, 2, 3, 4])
    assert cal["miou"] > 95.0 and 0.1 < cal["fg_threshold"] < 0.3


def test_shift_puts_the_threshold_on_one_half():
    p = np.array([0.05, 0.2, 0.3, 0.9])
    q = shift(p, 0.2)
    assert q[1] == pytest.approx(0.5) and np.all(np.diff(q) > 0)  # order kept
    assert (q >= 0.5).tolist() == (p >= 0.2).tolist()
    assert shift(p, 0.5) is p


def test_offset_moves_a_threshold_in_log_odds():
    assert apply_offset(0.5, np.log(3.0)) == pytest.approx(0.75)  # odds 1 -> 3
    assert apply_offset(0.2, 0.0) == 0.2
    moved = [apply_offset(0.2, d) for d in (-1.0, 0.0, 1.0, 2.0)]
    assert np.all(np.diff(moved) > 0) and 0.0 < moved[0] and moved[-1] < 1.0
    # the predictor's shift then calls present exactly the probabilities at or above the moved threshold
    p = np.array([0.1, 0.3, 0.55, 0.7])  # the moved threshold is 0.538
    assert (shift(p, apply_offset(0.3, 1.0)) >= 0.5).tolist() == [False, False, True, True]


def test_presence_threshold_resolves_a_band_narrower_than_a_grid_step():
    """An under-confident head: present 0.512, absent 0.508, both between two 0.05 grid steps. A grid leaves
    ER at the base rate; the exact search separates them (reports/LEARNER.md, "train.calibrate")."""
    r = shy_records()
    r.presence = np.where(r.labels, 0.512, 0.508) + np.random.default_rng(1).normal(0, 1e-4, r.labels.size)
    grid_er = max(episode_scores(r, t, 0.5, [1, 2, 3, 4])[0] for t in np.arange(0.05, 1.0, 0.05))
    assert grid_er == 50.0
    cal = calibrate(r, [1, 2, 3, 4])
    assert cal["er"] == 100.0 and 0.508 < cal["presence_threshold"] < 0.512
