"""The fscs study as a Prefect flow: one task per DVC stage, each running `dvc repro --single-item`.

DVC keeps deciding what is stale and caches the outputs; Prefect shows each stage, its logs and duration.
Stages run one after another because DVC holds a repository lock during `repro`. The flow always runs in
this project (the folder holding this file): the Prefect API has no authentication, so the folder is not a
flow parameter a caller could point elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.dvc_cli import dvc
from flows.dvc_graph import upstream_first
from fscs.config.params import load_config

ROOT = Path(__file__).resolve().parent.parent


def study_targets(
    supervisions: list[str] | None = None, folds: list[int] | None = None, repo: str | Path = ROOT
) -> list[str]:
    """The stages that finish the chosen settings and folds (default: params.yaml `study`): their
    evaluations and baselines, and the report when every setting and fold of `study` is selected (it reads
    all of their evaluation files)."""
    study = load_config(Path(repo) / "params.yaml").study
    supervisions = supervisions or list(study.supervisions)
    folds = folds if folds is not None else list(study.folds)
    unknown = sorted(set(supervisions) - set(study.supervisions)) + sorted(
        str(f) for f in set(folds) - set(study.folds)
    )
    if unknown:
        raise ValueError(f"not in params.yaml study: {unknown}")
    complete = set(supervisions) == set(study.supervisions) and set(folds) == set(study.folds)
    targets = [f"evaluate@{s}-{f}" for s in supervisions for f in folds] + [f"baselines@{f}" for f in folds]
    return targets + (["report"] if complete else [])


def stage_plan(
    supervisions: list[str] | None = None, folds: list[int] | None = None, repo: str | Path = ROOT
) -> list[str]:
    """`study_targets` with everything upstream of them, in an order DVC's own graph allows (dvc.yaml order
    on ties)."""
    return upstream_first(repo, study_targets(supervisions, folds, repo))


@task(name="dvc-repro", task_run_name="{stage}", cache_policy=None, retries=0)
def dvc_repro(stage: str, repo: str) -> str:
    """Run one DVC stage (not its upstream: the flow orders them); stream its output into the task log."""
    dvc(["repro", "--single-item", stage], repo, get_run_logger())
    return stage


@flow(name="fscs-pipeline", log_prints=True)
def fscs_pipeline(supervisions: list[str] | None = None, folds: list[int] | None = None) -> list[str]:
    """Run the study's stages for the chosen supervision settings and folds (default: params.yaml `study`),
    one after another; the report only when every setting and fold is selected."""
    return [dvc_repro(stage, str(ROOT)) for stage in stage_plan(supervisions, folds)]


if __name__ == "__main__":
    fscs_pipeline()
