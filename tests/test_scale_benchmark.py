"""The paper-scale benchmark runs end to end at toy N: its rows hold the budget and its table compares N."""

from __future__ import annotations

import json

import pytest

from benchmarks.scale import main, median_row, paper_bytes_per_image, table


def test_paper_row_bytes_follow_the_formula():
    fp16 = 2 * (12 * 2501 * 384 + 6 * 64 + 6 * 2500 * 64)
    assert 0 < paper_bytes_per_image() - fp16 < 64
    assert paper_bytes_per_image("int8") < 0.51 * paper_bytes_per_image()


def test_median_row_and_table_compare_each_kind_with_its_smallest_n():
    rows = []
    for n, peaks in ((10, (100, 90, 110)), (20, (120, 121, 119))):
        runs = [
            {"phase": "evaluate", "mode": "store", "budget_mb": 8, "n": n, "pass_images_per_s": 1.0,
             "episodes_per_s": 1.0, "setup_rss_mib": 50, "peak_rss_mib": p}
            for p in peaks
        ]  # fmt: skip
        rows.append(median_row(runs))
    assert rows[0]["peak_rss_mib"] == 100 and rows[0]["peak_rss_range_mib"] == [90, 110]
    text = table(rows)
    assert "| 100 (90-110) | 1.00x |" in text and "| 120 (119-121) | 1.20x |" in text


@pytest.mark.slow
def test_benchmark_runs_at_toy_sizes_under_its_budget(tmp_path):
    out = tmp_path / "scale.json"
    main(["--sizes", "8", "16", "--budget-mb", "1", "--episodes", "2", "--modes", "store",
          "--workdir", str(tmp_path / "work"), "--json", str(out)])  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["extract"]["bytes_per_image"] > 900_000  # the 50x50 grid at width 48
    rows = {(r["phase"], r["budget_mb"], r["n"]): r for r in doc["rows"]}
    assert len(rows) == 8  # train / evaluate x budget / none x two N
    for (_, budget, _), r in rows.items():
        assert r["episodes_per_s"] > 0 and r["peak_rss_mib"] >= r["setup_rss_mib"]
        if budget:
            assert r["token_cache_peak_mib"] <= budget
