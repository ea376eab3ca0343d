"""The report's like-for-like comparisons (fscs.report.claims)."""

from __future__ import annotations

from fscs.report import claims


def entry(er: float, miou: float) -> dict:
    return {"1way1shot": {"er": er, "miou": miou, "fbiou": 0.0}, "folds": {}}


def test_each_learner_is_held_against_its_own_reference():
    summary = {
        "pixel": entry(70, 35),
        "image": entry(60, 20),
        "mixed": entry(65, 19),
        "baseline_attention": entry(55, 21),
        "baseline_prototype": entry(58, 15),
        "baseline_prototype_gt": entry(60, 30),
    }
    rows = {r["learner"]: r for r in claims(summary)}
    assert rows["pixel"] == {
        "learner": "pixel",
        "reference": "the GT-mask prototype matcher",
        "kind": "1way1shot",
        "er": 10.0,
        "miou": 5.0,
        "holds": True,
    }
    # image: best image-level baseline per metric (ER of prototype, mIoU of attention), not prototype_gt
    assert (rows["image"]["er"], rows["image"]["miou"], rows["image"]["holds"]) == (2.0, -1.0, False)
    assert (rows["mixed"]["er"], rows["mixed"]["miou"], rows["mixed"]["holds"]) == (5.0, -1.0, False)
    assert claims({"pixel": entry(1, 1)}) == []  # no reference run: nothing claimed
