"""The offline `dvc plots` template inlines the vega scripts and keeps DVC's placeholder."""

import pytest

from fscs.plots import SCRIPTS, offline_template


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
