"""What the flows need from DVC's own stage graph: the order, and how each stage's inputs reach a worker.

Read once from `dvc.repo.Repo(...).index` in the flow process; nothing here runs a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Stages that run a ViT or train a network: on a cluster they go to workers that offer the Dask resource GPU
# (a worker without a GPU may still offer it, e.g. in tests). Matched on the name before '@'.
GPU_STAGES = ("extract_shard", "enhancer", "train", "evaluate")


@dataclass(frozen=True)
class StagePlan:
    """One stage as the distributed flow sees it."""

    name: str
    upstream: tuple[str, ...]  # stages it depends on directly
    pull: tuple[str, ...]  # cached outs of upstream stages it reads: fetched from the DVC remote
    ship: tuple[str, ...]  # uncached outs of upstream stages it reads (reports): sent with the task
    local: tuple[str, ...]  # upstream stages whose outs are local to each workspace (the dataset link)
    uncached_outs: tuple[str, ...]  # its own uncached outs: sent back to the flow with the result
    is_local: bool  # all outs uncached and persistent (get_data): run in every workspace that needs it
    gpu: bool


def _stages(dvc_repo) -> dict:
    """dvc.yaml stages by name (.dvc files left out)."""
    named = ((getattr(stage, "name", None), stage) for stage in dvc_repo.index.stages)
    return {name: stage for name, stage in named if name}


def upstream_first(repo: str | Path, targets: list[str]) -> list[str]:
    """`targets` and every stage they depend on, dependencies before dependents (dvc.yaml order on ties)."""
    return list(plan_stages(repo, targets))


def plan_stages(repo: str | Path, targets: list[str]) -> dict[str, StagePlan]:
    """`targets` and everything upstream of them, as plans in a topological order of DVC's graph."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        stages = _stages(dvc_repo)
        unknown = [t for t in targets if t not in stages]
        if unknown:
            raise ValueError(f"not stages of {repo}/dvc.yaml: {unknown}")
        graph = dvc_repo.index.graph  # edges point from a stage to the stages it depends on
        needed = set().union(*({stages[t], *nx.descendants(graph, stages[t])} for t in targets))
        position = {stage: str(i).zfill(6) for i, stage in enumerate(stages.values())}
        order = nx.lexicographical_topological_sort(graph.subgraph(needed).reverse(), key=position.get)
        return {stage.name: _plan(stage, graph) for stage in order}


def _plan(stage, graph) -> StagePlan:
    """How `stage` gets each input: which upstream out covers each of its file deps."""
    upstream = sorted(graph.successors(stage), key=lambda s: s.name)
    pull, ship, local = [], [], []
    for dep in stage.deps:
        path = dep.def_path
        for up in upstream:
            for out in up.outs:
                if not _covers(out.def_path, path):
                    continue
                if _is_local(up):
                    local.append(up.name)
                elif out.use_cache:
                    pull.append(out.def_path)
                else:
                    ship.append(out.def_path)
    return StagePlan(
        name=stage.name,
        upstream=tuple(up.name for up in upstream),
        pull=tuple(dict.fromkeys(pull)),
        ship=tuple(dict.fromkeys(ship)),
        local=tuple(dict.fromkeys(local)),
        uncached_outs=tuple(out.def_path for out in stage.outs if not out.use_cache),
        is_local=_is_local(stage),
        gpu=stage.name.split("@")[0] in GPU_STAGES,
    )


def _covers(out: str, dep: str) -> bool:
    """Whether the out and the dep overlap: the same path, or one a folder holding the other."""
    out, dep = out.rstrip("/"), dep.rstrip("/")
    return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")


def _is_local(stage) -> bool:
    """A stage whose outs are all uncached and persistent: each workspace makes its own (never pushed)."""
    return bool(stage.outs) and all(not out.use_cache and out.persist for out in stage.outs)
