"""Reading params.yaml: one dict, with a clear error for a missing file or key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from fscs.errors import FscsError


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    """Load the params file as a nested dict."""
    p = Path(path)
    if not p.is_file():
        raise FscsError(f"{p}: params file not found")
    try:
        params = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise FscsError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(params, dict):
        raise FscsError(f"{p}: expected a mapping at the top level")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Return params[name], naming the missing section if absent."""
    if name not in params or not isinstance(params[name], dict):
        raise FscsError(f"params: missing section '{name}'")
    return params[name]
