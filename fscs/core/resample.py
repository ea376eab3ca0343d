"""Every numpy-level resizer: bilinear for probability maps, nearest neighbour for label masks and images.

Two bilinear and two nearest-neighbour resizers are kept on purpose: each pair differs in the last bit
(float32 torch kernels vs exact numpy index arithmetic), and the stored results depend on which one a
caller used. ``fscs.learn.model.correlation.resize_mask`` (area averaging of support masks) stays in the
model: it works on torch tensors on the model's device inside the forward pass."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from fscs.core.errors import FscsError


def size_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) from an int (square) or a pair."""
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def bilinear(grid_map: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize (torch, align_corners=False) of a (gh, gw) or (C, gh, gw) map to ``size``, float32."""
    t = torch.tensor(np.asarray(grid_map, dtype=np.float32))
    if t.ndim not in (2, 3):
        raise FscsError(f"bilinear: expected a (gh, gw) or (C, gh, gw) map, got shape {tuple(t.shape)}")
    squeeze = t.ndim == 2
    t = t[None, None] if squeeze else t[None]
    out = F.interpolate(t, size=size_hw(size), mode="bilinear", align_corners=False)[0]
    return (out[0] if squeeze else out).numpy()


@lru_cache(maxsize=256)
def _interp_1d(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for 1-D linear interpolation, align_corners=False."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def bilinear_gather(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (..., h, w) maps to (..., H, W) float32, equal to `bilinear` within 1e-5 (not bit
    for bit); returned as is when already that size. Done with gathers, separably: no BLAS or torch
    threads, which are very slow on a small, busy CPU (the evaluation's hot loop)."""
    maps = np.asarray(maps, dtype=np.float32)
    h_out, w_out = (int(s) for s in size)
    if maps.shape[-2:] == (h_out, w_out):
        return maps
    y0, y1, wy = _interp_1d(h_out, maps.shape[-2])
    x0, x1, wx = _interp_1d(w_out, maps.shape[-1])
    rows = maps[..., y0, :] * (1.0 - wy)[:, None] + maps[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1.0 - wx) + rows[..., x1] * wx


def nearest_torch(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 label mask -> ``size`` by torch's 'nearest-exact' (pixel centres, float32 scale: at some
    exact ties it picks the next source pixel, unlike `nearest`). The CST's label masks use this one."""
    t = torch.from_numpy(np.require(mask, np.uint8, ["C", "W"]))[
        None, None
    ]  # copied if read-only (torch warns)
    return F.interpolate(t, size=size_hw(size), mode="nearest-exact")[0, 0].numpy()


def nearest(arr: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W, ...) array -> ``size`` by nearest neighbour at pixel centres, in exact float64 index arithmetic
    (any dtype, trailing channels kept: label masks of the enhancer, images under figure overlays)."""
    h, w = size_hw(size)
    rows = np.minimum(((np.arange(h) + 0.5) * arr.shape[0] / h).astype(np.int64), arr.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * arr.shape[1] / w).astype(np.int64), arr.shape[1] - 1)
    return arr[rows][:, cols]
