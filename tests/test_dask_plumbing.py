"""The Dask flow's plumbing without a cluster: how each stage's inputs reach a worker (from DVC's graph of
this project), the worker's code sync, and the flow's rule for recording a worker's result."""

from __future__ import annotations

import io
import logging
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from flows.dvc_cli import dvc
from flows.dvc_graph import plan_stages
from flows.lockbook import StageRejected, record, stale
from flows.workspace import StageResult, pack_code, sync_code

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
    assert not plans["extract@msrc"].gpu and plans["extract_shard@0"].gpu  # the join is I/O only
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


def _dvc_project(path: Path, remote: Path) -> Path:
    """A no-git DVC project with one stage writing a cached out and an uncached report."""
    path.mkdir()
    (path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: echo hello > out.txt && echo report > rep.json\n"
        "    outs:\n      - out.txt\n      - rep.json:\n          cache: false\n"
    )
    for args in (["init", "--no-scm", "-q"], ["remote", "add", "-d", "r", str(remote)]):
        dvc(args, path)
    return path


def test_the_flow_records_a_worker_result_only_when_dvc_agrees(tmp_path):
    """A worker's result is kept when its outs are on the remote and `dvc status` agrees; otherwise
    dvc.lock and the uncached outs go back to what they were."""
    remote = tmp_path / "remote"
    worker = _dvc_project(tmp_path / "worker", remote)
    flow = _dvc_project(tmp_path / "flow", remote)
    dvc(["repro", "s"], worker)
    entry = yaml.safe_load((worker / "dvc.lock").read_text())["stages"]["s"]
    files = {"rep.json": (worker / "rep.json").read_bytes()}
    log = logging.getLogger("test")
    result = StageResult("s", entry, files, "w", 0.1)
    with pytest.raises(RuntimeError, match="dvc pull s failed"):  # nothing pushed yet
        record(flow, result, ("rep.json",), log)
    assert not (flow / "dvc.lock").exists() and not (flow / "rep.json").exists()
    dvc(["push", "s"], worker)
    forged = dict(entry, cmd="echo forged > out.txt")
    with pytest.raises(StageRejected, match="dvc status still finds"):
        record(flow, StageResult("s", forged, files, "w", 0.1), ("rep.json",), log)
    assert not (flow / "dvc.lock").exists()
    record(flow, result, ("rep.json",), log)
    assert (flow / "out.txt").read_text() == "hello\n" and stale(flow, "s") == {}
