"""Project wiring: dvc.yaml lists every stage, paper configs keep up with params.yaml, the flow plan."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.pipeline import stage_plan

ROOT = Path(__file__).resolve().parent.parent


def _keys(d: dict, prefix: str = "") -> set[str]:
    """Dotted keys; ``train.by_supervision`` is one key (its contents are overrides, not defaults)."""
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and prefix + k != "train.by_supervision":
            out |= _keys(v, prefix + k + ".")
    return out


@pytest.mark.parametrize("config", ["pascal5i", "coco20i"])
def test_paper_configs_are_overrides_of_params_yaml(config):
    """Each key of a paper config changes a default (none repeats params.yaml), and the merge validates."""
    from fscs.config.overrides import WHOLE, merged_params

    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    paper = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())

    def repeated(over: dict, base: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in over.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict) and prefix + k not in WHOLE:
                out += repeated(v, base[k], prefix + k + ".")
            elif k in base and base[k] == v:
                out.append(prefix + k)
        return out

    assert not repeated(paper, default), f"configs/{config}.yaml repeats defaults"
    merged = merged_params(ROOT / "configs" / f"{config}.yaml", ROOT / "params.yaml")
    assert merged["backbone"]["name"] == "dino_vits8" and merged["backbone"]["input_size"] == 400
    assert merged["train"]["by_supervision"] == {} and merged["dataset"]["name"] == config
    assert merged["episodes"]["shots"] == default["episodes"]["shots"]  # a default carried over
    assert _keys(default) - {"train.by_supervision"} <= _keys(merged)


def test_dvc_yaml_lists_the_full_matrix():
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    dvc = str(Path(sys.executable).parent / "dvc")
    out = subprocess.run(
        [dvc, "stage", "list", "--name-only"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    names = set(out.stdout.split())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["study"]
    expected = set(stage_plan(params["supervisions"], params["folds"]))
    assert expected == names


def test_pipeline_paths_are_the_ones_dvc_yaml_passes():
    """Code that runs a step outside DVC finds each file where the train and evaluate stages read it."""
    from fscs.config.paths import pipeline_paths

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    name = params["dataset"]["name"]
    given = {}
    for stage in ("train", "evaluate"):
        cmd = stages[stage]["cmd"].replace("${dataset.name}", name)
        cmd = cmd.replace("${features.path}", params["features"]["path"])
        given.update(re.findall(r"--(\w+) (\S+)", cmd))
    paths = pipeline_paths(name)
    assert paths == {k: given[k] for k in paths}


def test_stage_plan_follows_the_dvc_graph(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the flow may run anywhere: names must not depend on the working directory
    plan = stage_plan(["image", "pixel"], [0, 2])
    assert plan[:6] == ["get_data", "prepare", "extract_shard@0", "extract@msrc", "pseudo", "enhancer"]
    assert plan.index("train@image-0") < plan.index("evaluate@image-0")
    assert "report" not in plan  # a partial selection: the report reads every setting and fold
    assert "baselines@2" in plan and "train@pixel-2" in plan
    assert stage_plan()[-1] == "report"
    shared = ["get_data", "prepare", "extract_shard@0", "extract@msrc", "pseudo", "enhancer"]
    assert stage_plan(["image"], [0]) == [
        *shared,
        "train@image-0",
        "evaluate@image-0",
        "baselines@0",
    ]


def test_metrics_are_git_tracked_not_cached():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for entry in stages["report"]["metrics"]:
        ((path, opts),) = entry.items()
        assert opts == {"cache": False}, path
    assert json.dumps(stages)  # plain data, no YAML tags


#: Numbered work-log references (stop, issue, sweep or lead followed by a number): history belongs in git.
WORK_LOG = re.compile(r"\b(stop|issue|sweep|lead)s? ?#?[0-9]+\b", re.IGNORECASE)
#: Product text and code: what a user reads or runs (tests, which find the data this machine has, excepted
#: from the second rule only).
PRODUCT = ["README.md", "Makefile", "pyproject.toml", "params.yaml", "dvc.yaml", ".ci/run"]
PRODUCT_GLOBS = [
    "docs/*.md",
    "reports/*.md",
    "reports/variants/*",
    "configs/*",
    "fscs/**/*.py",
    "fscs/**/*.cpp",
]
PRODUCT_GLOBS += ["stages/*.py", "flows/*.py", "benchmarks/*.py", "experiments/*.py"]


def _product_files() -> list[Path]:
    files = [ROOT / name for name in PRODUCT]
    for pattern in PRODUCT_GLOBS:
        files += sorted(ROOT.glob(pattern))
    return [f for f in files if f.is_file()]


@pytest.mark.parametrize("folder", ["product", "tests"])
def test_no_work_log_references(folder):
    """No "stop N" / "issue N" / "sweep N" in what users read or in the tests: the git history keeps them."""
    files = _product_files() if folder == "product" else sorted((ROOT / "tests").glob("*.py"))
    found = [
        f"{f.relative_to(ROOT)}:{n}: {m.group(0)!r}"
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        for m in WORK_LOG.finditer(line)
    ]
    assert not found, "\n".join(found)


def test_product_text_never_names_the_workplace_data_folder():
    """Users get the data through FSCS_MSRC_SOURCE or the download, not a folder of these machines."""
    found = [
        f"{f.relative_to(ROOT)}:{n}"
        for f in _product_files()
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if "../shared" in line
    ]
    assert not found, found
