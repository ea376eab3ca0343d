"""Run the `dvc` command line of this interpreter's environment, streaming its output to a logger."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path


def dvc_env() -> dict[str, str]:
    """Environment for dvc: analytics off, this interpreter's bin first on PATH (stages call `python`)."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


Logger = logging.Logger | logging.LoggerAdapter


def dvc(
    args: list[str], cwd: str | Path, logger: Logger | None = None, env: dict[str, str] | None = None
) -> str:
    """Run `dvc *args` in `cwd` (with `env` added to the environment), logging each output line; return the
    output; raise naming the command on failure."""
    cmd = [str(Path(sys.executable).parent / "dvc"), *args]
    if logger:
        logger.info("$ dvc %s  (in %s)", " ".join(args), cwd)
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**dvc_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            lines.append(line)
            if logger:
                logger.info(line)
    if proc.wait() != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {proc.returncode}): {' | '.join(lines[-5:])}")
    return "\n".join(lines)
