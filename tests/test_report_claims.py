"""The report's like-for-like comparisons (fscs.report.study.claims)."""

from __future__ import annotations

from fscs.report.study import claims


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


def test_variant_rows_show_a_recorded_variant_and_the_margin_over_it(tmp_path):
    import json

    from fscs.report.study import variant_rows
    from stages.report import variant_records

    record = {
        "dataset": "msrc",
        "name": "CST + prior",
        "model": "CST with a prior",
        "commit": "abc1234",
        "how": "An earlier default run.",
        "metrics": {"image": {"1way1shot": {"er": 60.0, "miou": 18.0, "fbiou": 0.0}}},
    }
    lines = variant_rows({"image": entry(62.5, 19.0)}, [record], ["1way1shot", "2way1shot"])
    assert "CST + prior" in lines[1] and "commit abc1234" in lines[1]
    assert lines[-1] == "| image | 60.0 / 18.0 (+1.0 / +2.5) | – |"
    assert variant_rows({}, [], ["1way1shot"]) == []
    (tmp_path / "a.json").write_text(json.dumps(record))
    (tmp_path / "b.json").write_text(json.dumps({**record, "dataset": "pascal"}))
    assert variant_records(str(tmp_path), "msrc") == [record]  # another dataset's record is not shown
    assert variant_records(str(tmp_path / "missing"), "msrc") == []
