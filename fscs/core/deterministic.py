"""CUDA stand-ins for the training ops torch refuses under ``use_deterministic_algorithms(True)`` on CUDA.

The backward of bilinear ``F.interpolate`` and the NLL loss have no deterministic CUDA kernel; here they
become GEMMs with fixed interpolation matrices and a ``log_softmax`` + ``gather``, which do (with
``CUBLAS_WORKSPACE_CONFIG``, see `fscs.core.device`). On the CPU the original torch ops run unchanged, so CPU
results stay bit-identical; on CUDA they agree with them up to float rounding (`tests/test_device.py`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def stand_in(t: torch.Tensor) -> bool:
    """Whether ``t``'s device takes the stand-ins (CUDA); the tests force it to check them on the CPU."""
    return t.is_cuda


#: (n_in, n_out, scale, device, dtype) matrices kept: a training run uses two sizes per axis (the forward's
#: and the loss's upsampling), so a few dozen cover several models and devices in one process
MATRIX_CACHE = 32


def _bilinear_matrix(n_in: int, n_out: int, scale: float, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear resampling, ``align_corners=False`` (torch's source index rule),
    on ``like``'s device and dtype; built once per shape there (`_cached_matrix`), not copied every call."""
    return _cached_matrix(int(n_in), int(n_out), float(scale), like.device, like.dtype)


@functools.lru_cache(maxsize=MATRIX_CACHE)
def _cached_matrix(
    n_in: int, n_out: int, scale: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The matrix of `_bilinear_matrix`, computed in float64 on the CPU, then moved; callers never write it.

    Built outside inference mode even when first asked for inside it: an inference tensor could not be used
    later in a training step's autograd graph."""
    with torch.inference_mode(False):
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        w1 = src - i0
        a = torch.zeros(n_out, n_in, dtype=torch.float64)
        rows = torch.arange(n_out)
        a.index_put_((rows, i0), 1.0 - w1, accumulate=True)
        a.index_put_((rows, i1), w1, accumulate=True)
        return a.to(device, dtype)


def interpolate_bilinear(
    x: torch.Tensor, size: tuple[int, int] | None = None, scale_factor: float | None = None
) -> torch.Tensor:
    """``F.interpolate(x, size | scale_factor, mode="bilinear", align_corners=False)`` of (B, C, H, W);
    on CUDA as ``A_h @ x @ A_w^T``, whose backward is deterministic."""
    if not stand_in(x):
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    if size is None:
        size = (math.floor(h * scale_factor), math.floor(w * scale_factor))
        scales = (1.0 / scale_factor, 1.0 / scale_factor)
    else:
        scales = (h / size[0], w / size[1])
    a_h = _bilinear_matrix(h, size[0], scales[0], x)
    a_w = _bilinear_matrix(w, size[1], scales[1], x)
    return torch.matmul(torch.matmul(a_h, x), a_w.t())


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """``F.cross_entropy`` over dim 1 (``mean`` over non-ignored targets or ``sum``); on CUDA through
    ``log_softmax`` and ``gather``, whose backward is deterministic."""
    if not stand_in(logits):
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    keep = target != ignore_index
    picked = F.log_softmax(logits, dim=1).gather(1, torch.where(keep, target, 0).unsqueeze(1)).squeeze(1)
    total = -(picked * keep).sum()
    return total if reduction == "sum" else total / keep.sum()
