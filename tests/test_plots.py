"""The offline `dvc plots` template inlines the vega scripts and keeps DVC's placeholder."""

import pytest

from fscs.report.plots import SCRIPTS, offline_template


def test_template_inlines_scripts_and_escapes_closing_tags(tmp_path):
    for rel in SCRIPTS:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"var lib = '{rel}'; s = '</script>';")
    html = offline_template(tmp_path)
    assert html.count("{plot_divs}") == 1
    assert all(rel in html for rel in SCRIPTS)
    assert "http" not in html  # nothing loaded from a CDN
    assert html.count("</script>") == len(SCRIPTS)  # the inlined '</script>' strings are escaped


def test_missing_package_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vega.min.js"):
        offline_template(tmp_path)


def test_dvc_yaml_draws_one_chart_per_setting_with_every_fold():
    """Top-level plots: each chart takes one curve column from every fold's CSV of one setting."""
    from pathlib import Path

    import yaml

    from fscs.learn.train import CURVE_COLUMNS

    root = Path(__file__).resolve().parents[1]
    doc = yaml.safe_load((root / "dvc.yaml").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    folds, settings = params["study"]["folds"], params["study"]["supervisions"]
    charts = {name: spec for entry in doc["plots"] for name, spec in entry.items()}
    for sup in settings:
        mine = {n: s for n, s in charts.items() if n.startswith(f"{sup} ")}
        assert len(mine) >= 3, sup
        for spec in mine.values():
            assert spec["x"] == "epoch"
            assert set(spec["y"]) == {f"reports/curves/{sup}-fold{f}.csv" for f in folds}
            assert len(set(spec["y"].values())) == 1 and next(iter(spec["y"].values())) in CURVE_COLUMNS
