"""The study on a local Dask cluster (`flows.dask_pipeline`): two worker processes with their own workspaces
and DVC caches, one offering GPU=1, data moving only through a DVC remote (a directory, or S3 served by moto
on 127.0.0.1). Same metrics as the sequential `dvc repro`, a no-op re-run, and a worker killed mid-stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tiny_repo import MSRC, make_tiny_repo, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MSRC.is_dir(), reason="needs ../shared/data/msrc-v2"),
]

GPU_STAGES = {"extract_shard@0", "enhancer", "train@image-0", "train@mixed-0", "train@pixel-0"}
GPU_STAGES |= {"evaluate@image-0", "evaluate@mixed-0", "evaluate@pixel-0"}


def dask_env(env: dict[str, str], tmp: Path) -> dict[str, str]:
    """The tiny repo's environment plus workspaces and a Prefect home of this test's own."""
    return dict(
        env,
        FSCS_WORKSPACES=str(tmp / "workspaces"),
        PREFECT_HOME=str(tmp / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )


def flow_cmd(summary: Path, *remote: str) -> list[str]:
    """The Dask flow's command line: a local cluster of two workers, the first offering GPU=1."""
    cmd = [sys.executable, "-m", "flows.dask_pipeline", "--workers", "2", "--gpu-workers", "1"]
    return [*cmd, "--summary", str(summary), *remote]


@pytest.fixture(scope="module")
def sequential_metrics(tiny_reproduced) -> bytes:
    repo, _ = tiny_reproduced
    return (repo / "reports/metrics.json").read_bytes()


@pytest.fixture(scope="module")
def dask_run(tmp_path_factory, tiny_reproduced) -> tuple[Path, dict[str, str], dict, bytes]:
    """A fresh tiny repo run once by the Dask flow against a directory remote."""
    _, seq_env = tiny_reproduced
    tmp = tmp_path_factory.mktemp("dask")
    env = dask_env(seq_env, tmp)
    repo = make_tiny_repo(tmp / "repo", env)
    run(flow_cmd(tmp / "run1.json", "--remote", str(tmp / "remote")), repo, env)
    return repo, env, json.loads((tmp / "run1.json").read_text()), (repo / "dvc.lock").read_bytes()


def test_dask_run_matches_the_sequential_run(dask_run, sequential_metrics):
    repo, env, summary, _ = dask_run
    assert (repo / "reports/metrics.json").read_bytes() == sequential_metrics
    assert json.loads(run(["dvc", "status", "--json"], repo, env).stdout) == {}


def test_gpu_stages_ran_on_the_gpu_worker_and_others_moved_data_through_the_remote(dask_run):
    _, _, summary, _ = dask_run
    where = {name: s.get("worker") for name, s in summary["stages"].items() if s["ran"]}
    assert {name for name in where if name in GPU_STAGES} == GPU_STAGES
    assert all(where[name] == "gpu-0" for name in GPU_STAGES), where
    assert where["get_data"] == "flow"  # the dataset link: every workspace makes its own
    assert "cpu-1" in where.values(), where  # the CPU worker read what the GPU worker pushed, and back


def test_second_dask_run_is_a_noop(dask_run, tmp_path):
    repo, env, _, lock = dask_run
    run(flow_cmd(tmp_path / "run2.json"), repo, env)  # the remote is now the project's default
    summary = json.loads((tmp_path / "run2.json").read_text())
    assert not [name for name, s in summary["stages"].items() if s["ran"]]
    assert (repo / "dvc.lock").read_bytes() == lock


def _stage_process(stage_module: str, flow_pid: int) -> psutil.Process | None:
    """A descendant of the flow running `python -m stage_module` (never another run's process on the
    machine: walking up from one of those would reach init and kill everything)."""
    try:
        descendants = psutil.Process(flow_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for proc in descendants:
        try:
            if stage_module in proc.cmdline():
                return proc
        except psutil.Error:
            continue
    return None


def _kill_worker_running(stage_module: str, flow_pid: int, timeout: float = 600) -> str:
    """Wait until a worker of the flow runs `python -m stage_module`; SIGKILL that worker and its children."""
    deadline = time.monotonic() + timeout
    while (proc := _stage_process(stage_module, flow_pid)) is None:
        assert time.monotonic() < deadline, f"{stage_module} never started"
        time.sleep(0.2)
    worker = proc
    while worker.parent() and worker.parent().pid != flow_pid:
        worker = worker.parent()
    victims = [worker, *worker.children(recursive=True)]
    cmdline = " ".join(worker.cmdline())
    for p in victims:
        p.send_signal(signal.SIGKILL)
    return cmdline


@pytest.fixture
def moto_s3(tmp_path):
    """An S3 server on 127.0.0.1 (moto) with one bucket; yields (remote URL, endpoint, credentials env)."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in creds.items() if "KEY" in k})
    s3.create_bucket(Bucket="fscs")
    yield "s3://fscs/store", endpoint, creds
    server.stop()


def test_killed_worker_loses_nothing_and_a_rerun_completes(
    tmp_path, tiny_reproduced, sequential_metrics, moto_s3
):
    """S3 remote (moto). A worker is killed while it trains; whatever the first run then does (Dask may
    retry the stage on the restarted worker), what it recorded stays recorded, and a re-run finishes with
    the sequential run's metrics."""
    url, endpoint, creds = moto_s3
    env = dict(dask_env(tiny_reproduced[1], tmp_path), **creds)
    repo = make_tiny_repo(tmp_path / "repo", env)
    remote = ["--remote", url, "--remote-option", f"endpointurl={endpoint}"]
    log = tmp_path / "run1.log"
    with log.open("w") as sink:
        cmd = flow_cmd(tmp_path / "run1.json", *remote)
        first = subprocess.Popen(cmd, cwd=repo, env=env, stdout=sink, stderr=subprocess.STDOUT)
        killed = _kill_worker_running("stages.train", first.pid)
        first.wait(timeout=900)
    out = log.read_text()
    assert "multiprocessing" in killed or "distributed" in killed, killed
    recorded = (repo / "dvc.lock").read_text()
    run(flow_cmd(tmp_path / "run2.json"), repo, env)
    second = json.loads((tmp_path / "run2.json").read_text())["stages"]
    for name in ("prepare", "extract@msrc", "pseudo", "enhancer"):  # recorded before the kill: not run again
        assert f"{name}:" in recorded and not second[name]["ran"], (name, out[-2000:])
    assert (repo / "reports/metrics.json").read_bytes() == sequential_metrics
    assert json.loads(run(["dvc", "status", "--json"], repo, env).stdout) == {}
    assert os.listdir(tmp_path / "workspaces")  # the workers' own workspaces, not the repo
