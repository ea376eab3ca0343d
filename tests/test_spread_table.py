"""The spread table's aggregation: fold means, leads over the prototype on the same folds, rule selection."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments.spread_table import TYPES, prototype_frame, spread_rows


def _metrics() -> dict:
    """A prototype at 10 (1-shot) / 20 (5-shot) mIoU on fold 0 and 30 / 40 on fold 1."""
    folds = {
        "0": {t: {"miou": 10.0 if t.endswith("1shot") else 20.0} for t in TYPES},
        "1": {t: {"miou": 30.0 if t.endswith("1shot") else 40.0} for t in TYPES},
    }
    return {"baseline_prototype_gt": {"folds": folds}}


def _runs() -> pd.DataFrame:
    rows = []
    for fold, base in ((0, 20.0), (1, 40.0)):
        for t in TYPES:
            shot5 = t.endswith("5shot")
            miou = base + 10 * shot5
            rows.append({"fold": fold, "run": "base", "rule": "joint", "setting": t, "miou": miou})
            if shot5:  # another rule on the same weights, 5-shot only (as experiments.spread writes it)
                rows.append({"fold": fold, "run": "base", "rule": "mean_logit", "setting": t, "miou": base})
    rows.append({"fold": 0, "run": "seed=1", "rule": "joint", "setting": "1way1shot", "miou": 0.0})
    for t in TYPES[1:]:
        rows.append({"fold": 0, "run": "seed=1", "rule": "joint", "setting": t, "miou": 50.0})
    return pd.DataFrame(rows)


def test_spread_rows_average_folds_and_compare_with_the_prototype_on_the_same_folds():
    table = spread_rows(_runs(), prototype_frame(_metrics()), rule=None).set_index("run")
    base, seed = table.loc["base"], table.loc["seed=1"]
    assert base["folds"] == "0, 1" and seed["folds"] == "0"
    assert base["1way1shot"] == pytest.approx(30.0) and base["1way5shot"] == pytest.approx(40.0)
    assert base["lead 1w5s"] == pytest.approx(10.0)  # 40 against the prototype's (20 + 40) / 2
    assert base["gain 1w"] == pytest.approx(10.0) and base["prototype gain 1w"] == pytest.approx(10.0)
    assert seed["lead 2w5s"] == pytest.approx(30.0)  # fold 0 only: 50 against 20
    assert seed["gain 1w"] == pytest.approx(50.0)


def test_spread_rows_score_5_shot_types_with_the_rule_asked_for():
    table = spread_rows(_runs(), prototype_frame(_metrics()), rule="mean_logit").set_index("run")
    assert table.loc["base", "1way5shot"] == pytest.approx(30.0)  # the other rule's 5-shot rows
    assert table.loc["base", "1way1shot"] == pytest.approx(30.0)  # 1-shot rows stay the trained rule's
    assert table.loc["base", "lead 1w5s"] == pytest.approx(0.0)
    assert "seed=1" not in table.index  # scored with the trained rule only
