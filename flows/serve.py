"""`make ui`: start a local Prefect server on 127.0.0.1 and serve the pipeline deployment beside it.

Open http://127.0.0.1:4200, pick the deployment `fscs-pipeline/fscs-default`, and run it (optionally with
other supervision settings or folds). Ctrl-C stops both the deployment and the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST, PORT = "127.0.0.1", int(os.environ.get("FSCS_PREFECT_PORT", "4200"))
API_URL = f"http://{HOST}:{PORT}/api"


def offline_prefect_env() -> dict[str, str]:
    """Prefect settings for an offline machine: repo-local home, no analytics, the local API."""
    return {
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(ROOT / ".prefect")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_API_URL": API_URL,
        "DVC_NO_ANALYTICS": "1",
    }


def wait_for_server(timeout: float = 120.0) -> None:
    """Poll the server's health endpoint until it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{API_URL}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Prefect server did not answer on {API_URL} within {timeout:.0f}s")


def main() -> None:
    """Start the server, then serve the deployment in this process until interrupted."""
    os.environ.update(offline_prefect_env())
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--host", HOST, "--port", str(PORT)])
    try:
        wait_for_server()
        print(f"Prefect UI: http://{HOST}:{PORT}  (deployment fscs-pipeline/fscs-default)")
        from flows.pipeline import fscs_pipeline

        fscs_pipeline.serve(name="fscs-default")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
