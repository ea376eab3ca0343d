"""The Dask flow's plumbing without a cluster: how each stage's inputs reach a worker (from DVC's graph of
this project), and the worker's code sync."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

from flows.dvc_graph import plan_stages
from flows.workspace import pack_code, sync_code

ROOT = Path(__file__).resolve().parent.parent


def test_stage_plans_route_cached_outs_through_the_remote_and_reports_with_the_task():
    plans = plan_stages(ROOT, ["report"])
    report = plans["report"]
    # `models/cst` is a folder dep holding the train stages' outs: each checkpoint is pulled
    assert {f"models/cst/{s}/fold{f}.pt" for s in ("image", "mixed", "pixel") for f in range(4)} <= set(
        report.pull
    )
    assert "reports/eval/pixel/fold0.json" in report.ship  # uncached upstream outs travel with the task
    assert report.local == ("get_data",) and not report.gpu and not report.is_local
    assert "reports/metrics.json" in report.uncached_outs
    assert plans["get_data"].is_local  # the dataset link: made in every workspace, never pushed
    train = plans["train@pixel-0"]
    assert train.gpu and "data/features/msrc.h5" in train.pull and "models/enhancer.pt" in train.pull
    assert not plans["extract"].gpu and plans["extract_shard@0"].gpu  # the join is I/O only
    assert list(plans).index("enhancer") < list(plans).index("train@pixel-0") < list(plans).index("report")


def _git_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir()
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    return path


def test_code_tar_leaves_out_dvc_outs_and_the_lock(tmp_path):
    repo = _git_repo(
        tmp_path / "repo",
        {
            "a.py": "x",
            "dvc.lock": "l",
            "reports/metrics.json": "{}",
            "reports/LEARNER.md": "m",
            ".gitignore": "",
        },
    )
    code = pack_code(repo, exclude=["reports/metrics.json", "dvc.lock"])
    names = set(tarfile.open(fileobj=io.BytesIO(code)).getnames())
    assert names == {"a.py", "reports/LEARNER.md", ".gitignore"}
    assert pack_code(repo, exclude=["reports/metrics.json", "dvc.lock"]) == code  # same files, same bytes


def test_sync_code_replaces_the_workspace_code_and_drops_removed_files(tmp_path):
    first = _git_repo(tmp_path / "v1", {"a.py": "1", "b.py": "1"})
    second = _git_repo(tmp_path / "v2", {"a.py": "2"})
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data.h5").write_text("a stage output")
    sync_code(ws, pack_code(first, []))
    assert (ws / "b.py").read_text() == "1"
    sync_code(ws, pack_code(second, []))
    assert (ws / "a.py").read_text() == "2" and not (ws / "b.py").exists()
    assert (ws / "data.h5").read_text() == "a stage output"  # not code: left alone
