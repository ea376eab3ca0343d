"""A git+DVC copy of the project with a tiny params.yaml (MSRC images, tiny random ViT, 1 epoch), for the
end-to-end tests of `dvc repro`, the Prefect flow and the Dask flow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MSRC = (ROOT.parent / "shared" / "data" / "msrc-v2").resolve()
BIN = Path(sys.executable).parent

TINY = {
    "episodes": {"test_per_fold": 8, "val_per_fold": 8, "ways": [1, 2], "shots": [1]},
    "backbone": {"name": "vit_tiny_random", "input_size": 64, "batch_size": 32},
    "pseudo": {"sweep": [0.4, 0.5]},
    "mixed": {"sweep": [0.1]},
    "enhancer": {"steps": 10},
    "train": {"epochs": 1, "episodes_per_epoch": 24, "label_size": 32, "patience": 1},
    "study": {"folds": [0]},
}


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) else value
    return out


def tiny_env(tmp: Path) -> dict[str, str]:
    """Environment for dvc in a tiny repo under `tmp`: no analytics, MSRC linked from ../shared."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"))
    env["FSCS_MSRC_SOURCE"] = str(MSRC)  # no shared/ above the temporary repo: stage get_data links this
    env["FSCS_CACHE"] = str(tmp / "cache")
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output tail if it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def make_tiny_repo(repo: Path, env: dict[str, str]) -> Path:
    """Copy the project's code into `repo` with tiny params, as a fresh git + DVC repository (nothing run)."""
    repo.mkdir(parents=True)
    for name in ("fscs", "stages", "flows", "dvc.yaml", "reports/variants"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / name)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    run(["git", "init", "-q"], repo, env)
    run(["git", "config", "user.email", "t@t"], repo, env)
    run(["git", "config", "user.name", "t"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    run(["dvc", "config", "core.analytics", "false"], repo, env)
    return repo
