"""`make ui`: start a local Prefect server on 127.0.0.1 and serve the pipeline deployment beside it.

Open http://127.0.0.1:4200, pick the deployment `fscs-pipeline/fscs-default`, and run it (optionally with
other supervision settings or folds). The server and the deployment run as two child processes watched by
this one: Ctrl-C or SIGTERM stops both within seconds, and a server that dies ends the deployment with a
message (exit 1) instead of leaving it retrying a dead API.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST, PORT = "127.0.0.1", int(os.environ.get("FSCS_PREFECT_PORT", "4200"))
API_URL = f"http://{HOST}:{PORT}/api"
STOP_SECONDS = 5.0  # how long a child gets to exit after SIGTERM before it is killed
SERVE = "from flows.pipeline import fscs_pipeline; fscs_pipeline.serve(name='fscs-default')"


def offline_prefect_env() -> dict[str, str]:
    """Prefect settings for an offline machine: repo-local home, no analytics, the local API."""
    return {
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(ROOT / ".prefect")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_API_URL": API_URL,
        "DVC_NO_ANALYTICS": "1",
    }


def wait_for_server(server: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll the server's health endpoint until it answers; stop early if the server process has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the Prefect server exited (code {server.returncode}) before answering")
        try:
            with urllib.request.urlopen(f"{API_URL}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Prefect server did not answer on {API_URL} within {timeout:.0f}s")


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each child's process group, then SIGKILL whatever is still running after STOP_SECONDS."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def supervise(server: subprocess.Popen, serve: subprocess.Popen, poll: float = 0.5) -> int:
    """Wait until either child exits; a dead server ends the serve loop with a message (exit code 1)."""
    while True:
        if server.poll() is not None:
            print(
                f"flows.serve: the Prefect server exited (code {server.returncode}); stopping the deployment",
                file=sys.stderr,
            )
            return 1
        if serve.poll() is not None:
            return serve.returncode
        time.sleep(poll)


def run_both(server_cmd: list[str], serve_cmd: list[str], ready: Callable[[subprocess.Popen], None]) -> int:
    """Start the server, wait for ``ready(server)``, start the deployment, supervise; always stop both."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below on SIGTERM too
    env = {**os.environ, **offline_prefect_env()}
    procs = [subprocess.Popen(server_cmd, env=env, start_new_session=True)]
    try:
        ready(procs[0])
        procs.append(subprocess.Popen(serve_cmd, env=env, cwd=ROOT, start_new_session=True))
        print(f"Prefect UI: http://{HOST}:{PORT}  (deployment fscs-pipeline/fscs-default)", flush=True)
        return supervise(procs[0], procs[1])
    except KeyboardInterrupt:
        return 130
    finally:
        stop(procs)


def main() -> None:
    """`make ui`: the Prefect server and the served deployment until either ends or this is stopped."""
    prefect = str(Path(sys.executable).parent / "prefect")
    server = [prefect, "server", "start", "--host", HOST, "--port", str(PORT)]
    sys.exit(run_both(server, [sys.executable, "-c", SERVE], wait_for_server))


if __name__ == "__main__":
    main()
