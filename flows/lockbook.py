"""The flow's side of the distributed run: decide what is stale, and record what a worker returns.

Only the flow process writes the project's `dvc.lock`, one stage at a time, so DVC's repository lock is
never contended. A worker's result is kept only if DVC itself agrees with it: its cached outs pull from the
remote, and afterwards `dvc status <stage>` finds the command, params, deps and outs as recorded.
Otherwise `dvc.lock` and the uncached outs go back to what they were, and the stage fails.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dvc.utils.serialize import modify_yaml

from flows.dvc_cli import dvc
from flows.workspace import StageResult, read_tree, write_tree
from fscs.core.io import atomic_path


class StageRejected(RuntimeError):
    """A worker's result that DVC does not accept in the flow's workspace."""


def stale(repo: Path, stage: str) -> dict:
    """What `dvc status` finds changed for one stage in the flow's workspace ({} when up to date)."""
    return json.loads(dvc(["status", "--json", stage], repo) or "{}")


def record(
    repo: Path, result: StageResult, outs: tuple[str, ...], logger: logging.Logger | logging.LoggerAdapter
) -> None:
    """Write a worker's lock entry and uncached outs (at `outs`) into the flow's workspace; keep them only if
    the cached outs pull from the remote and DVC then reports the stage up to date."""
    lock = repo / "dvc.lock"
    lock_before = lock.read_bytes() if lock.is_file() else None
    files_before = read_tree(repo, [rel for rel in outs if (repo / rel).exists()])
    try:
        write_tree(repo, outs, result.files)
        with modify_yaml(str(lock)) as data:
            data.setdefault("schema", "2.0")
            data.setdefault("stages", {})[result.stage] = result.entry
        dvc(["pull", result.stage], repo, logger)
        left = stale(repo, result.stage)
        if left:
            raise StageRejected(f"{result.stage}: after recording, dvc status still finds {left}")
    except Exception:
        write_tree(repo, outs, files_before)
        if lock_before is None:
            lock.unlink(missing_ok=True)
        else:
            with atomic_path(lock) as tmp:
                tmp.write_bytes(lock_before)
        raise
    logger.info("recorded %s (ran %.1f s on worker %s)", result.stage, result.seconds, result.worker)
