"""A worker's side of the distributed flow: run one DVC stage in the worker's own workspace.

Each worker keeps one workspace per project: the flow's code (sent as a tar), the flow's current `dvc.lock`,
its own DVC cache, and the project's DVC remote. Cached inputs come from the remote (`dvc pull`), small
uncached ones (reports) come with the task; the stage runs with `dvc repro --single-item`, its cached outs
go to the remote (`dvc push`), and its lock entry and uncached outs go back to the flow, which alone writes
the project's `dvc.lock`. Nothing here imports Prefect or Dask, so it runs anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flows.dvc_cli import dvc
from flows.dvc_graph import StagePlan

MANIFEST = ".fscs-code.json"  # which files the last code sync wrote, and their tar's digest


@dataclass(frozen=True)
class Remote:
    """A DVC remote: URL plus options such as `endpointurl`."""

    url: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageJob:
    """Everything a worker needs to run one stage."""

    plan: StagePlan
    project: str  # workspace folder name: one per flow project
    code: bytes  # tar of the project's code and configuration (no DVC outs, no dvc.lock)
    lock: str  # the flow's dvc.lock as it stands when the stage is submitted
    shipped: dict[str, bytes]  # the upstream uncached outs the stage reads, file by file
    remote: Remote | None
    env: dict[str, str] = field(default_factory=dict)  # defaults for the worker's environment (see below)


@dataclass(frozen=True)
class StageResult:
    """What a worker sends back: the stage's lock entry, its uncached outs, and where and how long it ran."""

    stage: str
    entry: dict
    files: dict[str, bytes]
    worker: str
    seconds: float


def pack_code(repo: Path, exclude: list[str]) -> bytes:
    """A tar of the files git sees in `repo` (tracked or untracked, not ignored) minus `exclude` paths
    (DVC outs and dvc.lock: those travel through the remote or with each task)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True, check=True
    ).stdout.decode()
    skip = [p.rstrip("/") for p in exclude]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in sorted(filter(None, listed.split("\0"))):
            if any(rel == s or rel.startswith(s + "/") for s in skip) or not (repo / rel).is_file():
                continue
            info = tar.gettarinfo(str(repo / rel), arcname=rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with (repo / rel).open("rb") as f:
                tar.addfile(info, f)
    return buf.getvalue()


def read_tree(root: Path, paths: list[str] | tuple[str, ...]) -> dict[str, bytes]:
    """The files at `paths` under `root` (folders walked), keyed by path relative to `root`."""
    files: dict[str, bytes] = {}
    for rel in paths:
        path = root / rel
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in found:
            if p.is_file():
                files[p.relative_to(root).as_posix()] = p.read_bytes()
    return files


def write_tree(root: Path, outs: list[str] | tuple[str, ...], files: dict[str, bytes]) -> None:
    """Replace the outs at `outs` under `root` by `files`: what was there goes first, folders included."""
    for rel in outs:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def workspace_dir(project: str, worker: str) -> Path:
    """This worker's workspace for `project`: under $FSCS_WORKSPACES (default: the temp folder)."""
    base = Path(os.environ.get("FSCS_WORKSPACES") or Path(tempfile.gettempdir()) / "fscs-workspaces")
    return base / project / re.sub(r"[^A-Za-z0-9_.-]", "_", worker)


def sync_code(ws: Path, code: bytes) -> None:
    """Unpack the flow's code into the workspace (skipped if unchanged), removing files the flow dropped."""
    digest = hashlib.sha256(code).hexdigest()
    manifest = ws / MANIFEST
    old = json.loads(manifest.read_text()) if manifest.is_file() else {"digest": "", "files": []}
    if old["digest"] == digest:
        return
    with tarfile.open(fileobj=io.BytesIO(code)) as tar:
        names = tar.getnames()
        tar.extractall(ws, filter="data")
    for rel in set(old["files"]) - set(names):
        (ws / rel).unlink(missing_ok=True)
    manifest.write_text(json.dumps({"digest": digest, "files": names}))


def configure_dvc(ws: Path, remote: Remote | None) -> None:
    """Workspace-only DVC settings: no git here, and the flow's remote as the default one."""
    lines = ["[core]", "    no_scm = true"]
    if remote:
        lines += ["    remote = fscs", "['remote \"fscs\"']", f"    url = {remote.url}"]
        lines += [f"    {key} = {value}" for key, value in sorted(remote.options.items())]
    (ws / ".dvc" / "config.local").write_text("\n".join(lines) + "\n")


def run_stage(job: StageJob, worker: str, logger: logging.Logger | logging.LoggerAdapter) -> StageResult:
    """Bring the workspace to the flow's state, run the stage, push its outs, return its record."""
    start = time.monotonic()
    plan = job.plan
    env = {key: value for key, value in job.env.items() if key not in os.environ}  # the worker's own win
    ws = workspace_dir(job.project, worker)
    ws.mkdir(parents=True, exist_ok=True)
    sync_code(ws, job.code)
    configure_dvc(ws, job.remote)
    (ws / "dvc.lock").write_text(job.lock)
    write_tree(ws, plan.ship, job.shipped)
    for local in plan.local:  # e.g. get_data: links or downloads the dataset on this machine
        dvc(["repro", "--single-item", local], ws, logger, env)
    if plan.pull:
        dvc(["pull", *plan.pull], ws, logger, env)
    dvc(["repro", "--single-item", plan.name], ws, logger, env)
    dvc(["push", plan.name], ws, logger, env)
    entry = (yaml.safe_load((ws / "dvc.lock").read_text()) or {}).get("stages", {}).get(plan.name)
    if entry is None:
        raise RuntimeError(f"{plan.name}: no dvc.lock entry in {ws} after dvc repro")
    files = read_tree(ws, plan.uncached_outs)
    return StageResult(plan.name, entry, files, worker, time.monotonic() - start)
