"""The inputs of `fscs predict` read and checked before anything runs: ``--support`` specs, mask PNGs and
the optional params file (as a validated `fscs.config.params.Config`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fscs.core.errors import FscsError

if TYPE_CHECKING:
    from fscs.config.params import Config


@dataclass
class SupportSpec:
    image: str
    cls: str
    mask: str | None


def parse_support(spec: str) -> SupportSpec:
    """'IMG:CLASS' or 'IMG:CLASS:MASK' -> SupportSpec; FscsError for anything else."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise FscsError(
            f"--support {spec!r}: expected IMG:CLASS or IMG:CLASS:MASK "
            "(paths without ':', a non-empty class name)"
        )
    return SupportSpec(parts[0], parts[1].strip(), parts[2] if len(parts) == 3 else None)


def read_config(path: str | os.PathLike | None) -> Config | None:
    """The validated params file when given (its ``pseudo`` and ``backbone`` sections are used), else None."""
    from fscs.config.params import load_config

    return None if path is None else load_config(path)


def load_mask_fg(path: str, shape: tuple[int, int]) -> np.ndarray:
    """The foreground (non-zero pixels) of a mask PNG as (H, W) bool; FscsError unless it is single-channel
    and of the image's ``shape``."""
    from fscs.data.images import WIDE_GREY, open_image

    with open_image(path, "mask") as im:
        arr = np.asarray(im.convert("L") if im.mode not in ("P", "L", "1", *WIDE_GREY) else im)
    if arr.ndim != 2:
        raise FscsError(f"{path}: mask must be a single-channel PNG, got shape {arr.shape}")
    if arr.shape != tuple(shape):
        raise FscsError(
            f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} but its image is {shape[1]}x{shape[0]} "
            "(width x height)"
        )
    return arr != 0
