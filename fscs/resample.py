"""Bilinear upsampling of token-grid maps to an image size (pseudo-label maps, enhancer outputs)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fscs.errors import FscsError


def size_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) from an int (square) or a pair."""
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def upsample(grid_map: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize (align_corners=False) of a (gh, gw) or (C, gh, gw) map to ``size`` -> float32."""
    t = torch.tensor(np.asarray(grid_map, dtype=np.float32))
    if t.ndim not in (2, 3):
        raise FscsError(f"upsample: expected a (gh, gw) or (C, gh, gw) map, got shape {tuple(t.shape)}")
    squeeze = t.ndim == 2
    t = t[None, None] if squeeze else t[None]
    out = F.interpolate(t, size=size_hw(size), mode="bilinear", align_corners=False)[0]
    return (out[0] if squeeze else out).numpy()
