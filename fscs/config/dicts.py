"""params.yaml as the plain nested dict the library takes (validated by `fscs.config.params`)."""

from __future__ import annotations

import os
from typing import Any

from fscs.config.params import load_config
from fscs.core.errors import FscsError


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    """The validated params file as a nested dict (FscsError naming the param on bad input)."""
    return load_config(path).params()


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Return params[name], naming the missing section if absent."""
    if name not in params or not isinstance(params[name], dict):
        raise FscsError(f"params: missing section '{name}'")
    return params[name]
