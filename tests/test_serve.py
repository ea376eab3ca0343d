"""`make ui` (flows.serve) stops cleanly: SIGTERM ends the server and the deployment within seconds, and a
dead server ends the serve loop with a message (stand-in children replace Prefect, so this is fast); and the
served flow cannot be pointed at another folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A child that records its pid, then sleeps; with "stubborn" it ignores SIGTERM (as a hung serve loop would).
CHILD = (
    "import os, signal, sys, time; open(sys.argv[1], 'w').write(str(os.getpid()));"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN) if sys.argv[2] == 'stubborn' else None;"
    "time.sleep(float(sys.argv[3]))"
)
WRAPPER = (
    "import json, sys; import flows.serve as s; s.STOP_SECONDS = 1.0;"
    "a = json.loads(sys.argv[1]); sys.exit(s.run_both(a[0], a[1], lambda p: None))"
)


def child(tmp_path: Path, name: str, mode: str, seconds: float) -> list[str]:
    return [sys.executable, "-c", CHILD, str(tmp_path / f"{name}.pid"), mode, str(seconds)]


def start(tmp_path: Path, server: list[str], serve: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRAPPER, json.dumps([server, serve])],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pids(tmp_path: Path, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    files = [tmp_path / "server.pid", tmp_path / "serve.pid"]
    while time.monotonic() < deadline:
        if all(f.is_file() and f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.1)
    pytest.fail("children did not start")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_server_and_deployment_promptly(tmp_path):
    proc = start(tmp_path, child(tmp_path, "server", "plain", 60), child(tmp_path, "serve", "stubborn", 60))
    children = pids(tmp_path)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert time.monotonic() - t0 < 5
    assert proc.returncode == 143
    assert not any(alive(p) for p in children)


def test_dead_server_ends_the_serve_loop_with_a_message(tmp_path):
    proc = start(tmp_path, child(tmp_path, "server", "plain", 1), child(tmp_path, "serve", "stubborn", 60))
    children = pids(tmp_path)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 1
    assert "the Prefect server exited (code 0); stopping the deployment" in err
    assert not any(alive(p) for p in children)


def test_the_flow_has_no_folder_parameter():
    """The Prefect API has no authentication: a caller may pick settings and folds, never the folder."""
    from flows.pipeline import ROOT as FLOW_ROOT
    from flows.pipeline import fscs_pipeline

    assert set(fscs_pipeline.parameters.properties) == {"supervisions", "folds"}
    assert FLOW_ROOT == ROOT
