"""End to end: the whole DVC graph on a tiny config (MSRC images, tiny random ViT, 1 epoch), then the
Prefect flow over it, the no-op re-run, what an edit re-runs, `dvc metrics diff` between two supervision
settings and a queued experiment (run by DVC in a temporary copy of the workspace)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from tiny_repo import MSRC, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MSRC.is_dir(), reason="needs ../shared/data/msrc-v2"),
]


@pytest.fixture
def tiny_repo(tiny_reproduced) -> tuple[Path, dict[str, str]]:
    return tiny_reproduced


def test_repro_builds_every_artifact(tiny_repo):
    repo, _ = tiny_repo
    assert os.readlink(repo / "data/raw/msrc") == str(MSRC)  # linked, not copied
    for rel in [
        "data/index/msrc.parquet",
        "data/episodes/msrc/test.parquet",
        "data/features/msrc.h5",
        "data/pseudo/msrc.h5",
        "data/pseudo/msrc-enhanced.h5",
        "models/enhancer.pt",
        "models/cst/image/fold0.pt",
        "models/cst/mixed/fold0.pt",
        "models/cst/pixel/fold0.pt",
        "reports/eval/baselines/fold0.json",
        "reports/README.md",
    ]:
        assert (repo / rel).is_file(), rel
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for setting in ("image", "mixed", "pixel"):
        for kind in ("1way1shot", "2way1shot"):
            values = metrics[setting][kind]
            assert set(values) == {"er", "miou", "fbiou"}
            assert all(0.0 <= v <= 100.0 for v in values.values())
    assert "fscs results" in (repo / "reports/README.md").read_text()


def test_second_repro_is_a_noop(tiny_repo):
    repo, env = tiny_repo
    out = run(["dvc", "repro"], repo, env).stdout
    assert "Running stage" not in out


def test_training_param_reruns_only_training_downstream(tiny_repo):
    repo, env = tiny_repo
    out = run(["dvc", "status", "--json"], repo, env).stdout
    assert json.loads(out) == {}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 0.002
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        stale = set(json.loads(run(["dvc", "status", "--json"], repo, env).stdout))
        assert {"train@image-0", "train@mixed-0", "train@pixel-0"} <= stale
        assert not stale & {"prepare", "extract@msrc", "pseudo", "enhancer", "baselines@0"}
    finally:
        run(["git", "checkout", "params.yaml"], repo, env)


def test_editing_evaluate_code_reruns_only_evaluate_and_report(tiny_repo):
    repo, env = tiny_repo
    with (repo / "stages/evaluate.py").open("a") as f:
        f.write("# an edit\n")
    try:
        stale = set(json.loads(run(["dvc", "status", "--json"], repo, env).stdout))
        assert stale == {"evaluate@image-0", "evaluate@mixed-0", "evaluate@pixel-0"}
        out = run(["dvc", "repro"], repo, env).stdout
        ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
        assert stale <= ran <= stale | {"report"}  # report only if an evaluation file changed
    finally:
        run(["git", "checkout", "stages/evaluate.py", "dvc.lock", "reports"], repo, env)
    assert json.loads(run(["dvc", "status", "--json"], repo, env).stdout) == {}


def test_queued_experiment_runs_in_a_temporary_copy(tiny_repo):
    """README's `dvc exp run --queue ... && dvc queue start`: the copy finds the data through get_data."""
    repo, env = tiny_repo
    run(["dvc", "exp", "run", "--queue", "-n", "cmp-image", "-S", "study.compare=image"], repo, env)
    run(["dvc", "queue", "start"], repo, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    logs = subprocess.run(
        ["dvc", "queue", "logs", "cmp-image"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert "Success" in status, f"{status}\n{logs.stdout[-3000:]}"
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    assert "cmp-image" in json.dumps(shown)


def test_metrics_diff_compares_two_settings_key_by_key(tiny_repo):
    repo, env = tiny_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["study"]["compare"] = "image"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        run(["dvc", "repro", "report"], repo, env)
        diff = json.loads(run(["dvc", "metrics", "diff", "--all", "--json"], repo, env).stdout)
        summary = diff["reports/summary.json"]
        assert "1way1shot.miou" in summary and "2way1shot.er" in summary
        assert summary["1way1shot.miou"]["old"] is not None and summary["1way1shot.miou"]["new"] is not None
    finally:
        run(["git", "checkout", "params.yaml", "reports", "dvc.lock"], repo, env)


def test_prefect_flow_runs_each_stage_as_a_task(tiny_repo):
    from prefect.client.schemas.objects import StateType
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import stage_plan

    repo, env = tiny_repo
    os.environ["PATH"] = env["PATH"]
    # the flow runs in the project holding it (no folder parameter): load the tiny repo's own copy
    spec = importlib.util.spec_from_file_location("tiny_pipeline", repo / "flows" / "pipeline.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    with prefect_test_harness(server_startup_timeout=180):
        state = tiny.fscs_pipeline(return_state=True)
        assert state.type == StateType.COMPLETED
        done = state.result()
    assert done == stage_plan(["image", "mixed", "pixel"], [0], repo=repo)
    assert (repo / "reports/metrics.json").is_file()
