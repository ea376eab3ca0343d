"""`make flow-dask`: the study on a Dask cluster under Prefect, DVC still the cache and the record.

Stages whose upstream is recorded run concurrently on Dask workers, each in its own workspace with its own
DVC cache; data moves only through the project's DVC remote (a directory, S3, ...). GPU stages
(`flows.dvc_graph.GPU_STAGES`) ask for the Dask resource `GPU=1` when the cluster offers it. The flow process
alone writes `dvc.lock` (`flows.lockbook`), so a re-run of a finished study is a no-op and a stage lost with
its worker is simply run again. Without `--address` a local cluster is started (default: two workers).

    python -m flows.dask_pipeline --remote /path/to/remote            # local cluster
    python -m flows.dask_pipeline --address tcp://scheduler:8786      # existing cluster, default remote
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import urllib.request
from pathlib import Path

import dask
import torch
from distributed import Client, Nanny, Scheduler, SpecCluster, get_worker
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner

from flows.dvc_cli import dvc
from flows.dvc_graph import StagePlan, plan_stages
from flows.lockbook import record, stale
from flows.pipeline import study_targets
from flows.serve import API_URL
from flows.workspace import Remote, StageJob, StageResult, pack_code, read_tree, run_stage
from fscs.config.params import load_config
from fscs.core.errors import FscsError
from fscs.data.get import local_copy, source_variable

ROOT = Path(__file__).resolve().parent.parent


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=0)
def run_on_worker(stage: str, job: StageJob) -> StageResult:
    """Run one stage in this Dask worker's workspace (the `stage` argument names the task run)."""
    try:
        worker = str(get_worker().name)
    except ValueError:  # not on a Dask worker (a plain Prefect run)
        worker = "local"
    return run_stage(job, worker, get_run_logger())


def default_remote(repo: Path) -> Remote:
    """The project's default DVC remote (URL and options), which every worker will use too."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        name = dvc_repo.config["core"].get("remote")
        if not name:
            raise SystemExit(
                "the Dask flow moves data through a DVC remote: pass --remote URL, or set one with "
                "`dvc remote add -d NAME URL`"
            )
        options = {k: str(v) for k, v in dvc_repo.config["remote"][name].items()}
    return Remote(options.pop("url"), options)


def dataset_source(repo: Path) -> dict[str, str]:
    """Where the flow's machine finds the dataset (`FSCS_<NAME>_SOURCE`, or shared/data above the project),
    for workers whose workspaces sit elsewhere. A worker's own variable wins; without either, a worker's
    `get_data` downloads the dataset."""
    name = load_config(repo / "params.yaml").dataset.name
    found = local_copy(name, repo)
    return {source_variable(name): str(Path(found).resolve())} if found else {}


def set_remote(repo: Path, remote: Remote) -> None:
    """Make `remote` this workspace's default DVC remote `fscs` (in .dvc/config.local, not committed)."""
    dvc(["remote", "add", "--local", "--force", "--default", "fscs", remote.url], repo)
    for key, value in remote.options.items():
        dvc(["remote", "modify", "--local", "fscs", key, value], repo)


@flow(name="fscs-pipeline-dask", log_prints=True)
def fscs_pipeline_dask(
    supervisions: list[str] | None = None,
    folds: list[int] | None = None,
    gpu_resource: bool = False,
    cpu_workers: list[str] | None = None,
) -> dict[str, dict]:
    """Run the study's stale stages on the flow's Dask task runner; return where each stage ran.

    Data moves through the project's default DVC remote. Which remote that is is not a flow parameter, so
    that a run started from the Prefect API (which has no authentication) cannot send the study's data
    elsewhere: `main` (``--remote``) sets it in .dvc/config.local before the flow starts."""
    logger = get_run_logger()
    repo = ROOT
    remote = default_remote(repo)
    plans = plan_stages(repo, study_targets(supervisions, folds, repo))
    code = pack_code(repo, exclude=[out for p in plans.values() for out in p.uncached_outs] + ["dvc.lock"])
    env = dataset_source(repo)
    project = f"{repo.name}-{hashlib.sha1(str(repo).encode()).hexdigest()[:8]}"
    done: dict[str, dict] = {}
    failed: list[str] = []
    running: dict[str, object] = {}
    waiting = list(plans)
    while True:
        ready = [n for n in waiting if all(u in done for u in plans[n].upstream)]
        for name in ready:
            waiting.remove(name)
            plan = plans[name]
            if not stale(repo, name):
                done[name] = {"ran": False}
            elif plan.is_local:  # the dataset link: the flow's workspace makes its own, like each worker's
                dvc(["repro", "--single-item", name], repo, logger)
                done[name] = {"ran": True, "worker": "flow"}
            else:
                job = _job(plan, repo, project, code, remote, env)
                running[name] = _submit(job, gpu_resource, cpu_workers or [])
        if any(n in done for n in ready):
            continue  # stages done here may have made others ready
        if not running:
            break
        future = next(as_completed(list(running.values())))
        name = next(n for n, f in running.items() if f is future)
        del running[name]
        try:
            result = future.result()
            future.wrapped_future.release()  # else Dask recomputes it if the worker holding it dies later
            record(repo, result, plans[name].uncached_outs, logger)
            done[name] = {"ran": True, "worker": result.worker, "seconds": round(result.seconds, 1)}
        except Exception as err:  # keep recording the others; downstream of a failure never starts
            logger.error("stage %s failed: %s", name, err)
            failed.append(name)
    if failed or waiting:
        raise RuntimeError(f"failed: {failed}; not started (upstream failed): {waiting}")
    return done


def _job(plan: StagePlan, repo: Path, project: str, code: bytes, remote: Remote, env: dict) -> StageJob:
    """One stage with the flow's current dvc.lock and the uncached upstream outs it reads."""
    lock = repo / "dvc.lock"
    return StageJob(
        plan=plan,
        project=project,
        code=code,
        lock=lock.read_text() if lock.is_file() else "",
        shipped=read_tree(repo, plan.ship),
        remote=remote,
        env=env,
    )


def _submit(job: StageJob, gpu: bool, cpu_workers: list[str]):
    """A GPU stage to a worker offering GPU (when one does), a CPU stage preferably to one that doesn't."""
    plan = job.plan
    if gpu and plan.gpu:
        placement = {"resources": {"GPU": 1}}
    elif gpu and cpu_workers:
        placement = {"workers": cpu_workers, "allow_other_workers": True}
    else:
        placement = {}
    with dask.annotate(**placement):
        return run_on_worker.submit(plan.name, job)


def worker_specs(workers: int, gpu_workers: int, share_gpus: bool = False) -> dict[str, dict]:
    """The Nanny specs of `local_cluster`: the first `gpu_workers` offer GPU=1 and see only their own CUDA
    device (``CUDA_VISIBLE_DEVICES = i % #GPUs``). More GPU workers than visible GPUs would put two workers
    on one card unknowingly, so that is refused unless `share_gpus`; with no CUDA only the resource is set."""
    cuda = torch.cuda.device_count()
    if cuda and gpu_workers > cuda and not share_gpus:
        raise FscsError(
            f"{gpu_workers} GPU workers but only {cuda} visible GPU(s): workers would share a card; "
            f"pass --gpu-workers {cuda} or fewer, or --share-gpus to share them on purpose"
        )
    specs = {}
    for i in range(workers):
        options: dict = {"nthreads": 1, "name": f"gpu-{i}" if i < gpu_workers else f"cpu-{i}"}
        if i < gpu_workers:
            options["resources"] = {"GPU": 1}
            if cuda:
                options["env"] = {"CUDA_VISIBLE_DEVICES": str(i % cuda)}
        specs[options["name"]] = {"cls": Nanny, "options": options}
    return specs


def local_cluster(workers: int, gpu_workers: int, share_gpus: bool = False) -> SpecCluster:
    """`workers` one-thread worker processes on this machine, the first `gpu_workers` of them GPU workers
    (see `worker_specs`, which refuses more GPU workers than GPUs unless `share_gpus`)."""
    specs = worker_specs(workers, gpu_workers, share_gpus)
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0", "host": "127.0.0.1"}}
    return SpecCluster(workers=specs, scheduler=scheduler)


def worker_roles(address: str) -> tuple[bool, list[str]]:
    """Whether any worker of the cluster at `address` offers the Dask resource GPU, and those that don't."""
    with Client(address) as client:
        workers = client.scheduler_info()["workers"]
    cpu = [addr for addr, w in workers.items() if not w.get("resources", {}).get("GPU")]
    return len(cpu) < len(workers), cpu


def ui_is_up() -> bool:
    """Whether `make ui`'s Prefect server answers on this machine."""
    try:
        with urllib.request.urlopen(f"{API_URL}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--address", help="scheduler of an existing Dask cluster (default: a local one)")
    parser.add_argument("--workers", type=int, default=2, help="local cluster: worker processes")
    parser.add_argument("--gpu-workers", type=int, help="workers with GPU=1 (default: #CUDA)")
    parser.add_argument(
        "--share-gpus", action="store_true", help="allow more GPU workers than GPUs (they share cards)"
    )
    parser.add_argument("--remote", help="DVC remote URL (default: the project's default remote)")
    parser.add_argument("--remote-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--supervisions", nargs="*")
    parser.add_argument("--folds", nargs="*", type=int)
    parser.add_argument("--summary", type=Path, help="write {stage: where it ran} and the wall time as JSON")
    args = parser.parse_args(argv)
    if args.remote:  # the user's choice, made here: the flow itself takes no remote (see its docstring)
        set_remote(ROOT, Remote(args.remote, dict(opt.split("=", 1) for opt in args.remote_option)))
    server = None
    if not os.environ.get("PREFECT_API_URL"):  # workers must report to the same API as the flow
        if ui_is_up():
            os.environ["PREFECT_API_URL"] = API_URL
        else:
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()  # lives as long as this run; `make ui` keeps the history
            server.start()
            os.environ["PREFECT_API_URL"] = server.api_url
    cluster = None
    address = args.address
    try:  # the cluster inside: a refused GPU worker count still stops the Prefect server
        if not address:
            gpu_workers = args.gpu_workers if args.gpu_workers is not None else torch.cuda.device_count()
            cluster = local_cluster(args.workers, min(gpu_workers, args.workers), share_gpus=args.share_gpus)
            address = cluster.scheduler_address
        start = time.monotonic()
        runner = fscs_pipeline_dask.with_options(task_runner=DaskTaskRunner(address=address))
        gpu, cpu_workers = worker_roles(address)
        done = runner(
            supervisions=args.supervisions,
            folds=args.folds,
            gpu_resource=gpu,
            cpu_workers=cpu_workers,
        )
    finally:
        if cluster:
            cluster.close()
        if server:
            server.stop()
    wall = time.monotonic() - start
    if args.summary:
        args.summary.write_text(json.dumps({"wall_s": round(wall, 1), "stages": done}, indent=1))
    ran = [f"{n} ({d['worker']}, {d.get('seconds', 0)} s)" for n, d in done.items() if d["ran"]]
    print(f"{len(ran)} stage(s) ran, {len(done) - len(ran)} up to date, {wall:.0f} s: " + "; ".join(ran))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
