"""The fscs study as a Prefect flow: one task per DVC stage, each running `dvc repro --single-item`.

DVC keeps deciding what is stale and caches the outputs; Prefect shows each stage, its logs and duration.
Stages run one after another because DVC holds a repository lock during `repro`. The flow always runs in
this project (the folder holding this file): the Prefect API has no authentication, so the folder is not a
flow parameter a caller could point elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task

from fscs.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def stage_plan(
    supervisions: list[str], folds: list[int], with_report: bool = True, repo: str | Path = ROOT
) -> list[str]:
    """The DVC stages to run for the chosen settings and folds: their evaluations and baselines (and the
    report), with everything upstream of them, in an order DVC's own graph allows (dvc.yaml order on ties)."""
    targets = [f"evaluate@{s}-{f}" for s in supervisions for f in folds] + [f"baselines@{f}" for f in folds]
    return upstream_first(repo, targets + (["report"] if with_report else []))


def upstream_first(repo: str | Path, targets: list[str]) -> list[str]:
    """`targets` and every stage they depend on, dependencies before dependents (from dvc.repo's graph)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        named = ((getattr(stage, "name", None), stage) for stage in dvc_repo.index.stages)
        stages = {name: stage for name, stage in named if name}  # dvc.yaml stages (not .dvc files)
        unknown = [t for t in targets if t not in stages]
        if unknown:
            raise ValueError(f"not stages of {repo}/dvc.yaml: {unknown}")
        graph = dvc_repo.index.graph  # edges point from a stage to the stages it depends on
        needed = set().union(*({stages[t], *nx.descendants(graph, stages[t])} for t in targets))
        position = {stage: str(i).zfill(6) for i, stage in enumerate(stages.values())}
        order = nx.lexicographical_topological_sort(graph.subgraph(needed).reverse(), key=position.get)
        return [stage.name for stage in order]


def _dvc_env() -> dict[str, str]:
    """Environment for dvc: analytics off, this interpreter's bin first on PATH (stages call `python`)."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@task(name="dvc-repro", task_run_name="{stage}", cache_policy=None, retries=0)
def dvc_repro(stage: str, repo: str) -> str:
    """Run one DVC stage (not its upstream: the flow orders them); stream its output into the task log."""
    logger = get_run_logger()
    cmd = [str(Path(sys.executable).parent / "dvc"), "repro", "--single-item", stage]
    logger.info("$ %s  (in %s)", " ".join(cmd[1:]), repo)
    proc = subprocess.Popen(
        cmd, cwd=repo, env=_dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            lines.append(line)
            logger.info(line)
    if proc.wait() != 0:
        raise RuntimeError(f"dvc repro {stage} failed (exit {proc.returncode}): {' | '.join(lines[-5:])}")
    return stage


@flow(name="fscs-pipeline", log_prints=True)
def fscs_pipeline(supervisions: list[str] | None = None, folds: list[int] | None = None) -> list[str]:
    """Run the study's stages for the chosen supervision settings and folds (default: params.yaml `study`).

    The report stage runs only when every setting and fold of params.yaml `study` is selected, because it
    reads all of their evaluation files.
    """
    repo = str(ROOT)
    study = load_config(ROOT / "params.yaml").study
    supervisions = supervisions or list(study.supervisions)
    folds = folds if folds is not None else list(study.folds)
    unknown = sorted(set(supervisions) - set(study.supervisions)) + sorted(
        str(f) for f in set(folds) - set(study.folds)
    )
    if unknown:
        raise ValueError(f"not in params.yaml study: {unknown}")
    complete = set(supervisions) == set(study.supervisions) and set(folds) == set(study.folds)
    done = []
    for stage in stage_plan(supervisions, folds, with_report=complete, repo=repo):
        done.append(dvc_repro(stage, repo))
    return done


if __name__ == "__main__":
    fscs_pipeline()
