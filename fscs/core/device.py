"""The one device rule and the extraction precision context.

``FSCS_DEVICE=auto|cpu|cuda|cuda:<i>`` (an environment variable, not a DVC param: a result cached on one
device stays valid on another; the device is recorded in stores, checkpoints and reports, never compared).
``auto`` (the default) is the first GPU when CUDA is available, else the CPU. Precision (``fp32 | bf16``,
``backbone.precision``) is a DVC param since it changes numbers; `autocast` applies it.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

from fscs.core.errors import FscsError

ENV = "FSCS_DEVICE"
PRECISIONS = ("fp32", "bf16")

#: cuBLAS needs a fixed workspace for deterministic GEMMs; read when its first handle is created.
CUBLAS_WORKSPACE = ":4096:8"


def resolve_device(value: str | None = None) -> torch.device:
    """``value`` (default ``$FSCS_DEVICE``, else ``auto``) -> a torch.device; FscsError for a bad/absent one.

    Resolving to CUDA also sets ``CUBLAS_WORKSPACE_CONFIG`` (unless set), before any cuBLAS call, so that
    ``torch.use_deterministic_algorithms(True)`` holds there, and turns TF32 off (cuDNN convolutions use it
    by default): ``fp32`` means float32 on every device."""
    raw = os.environ.get(ENV, "auto") if value is None else value
    v = raw.strip().lower()
    if v in ("", "auto"):
        v = "cuda" if torch.cuda.is_available() else "cpu"
    if v == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", v)
    if m is None:
        raise FscsError(f"{ENV}={raw!r}: expected auto, cpu, cuda or cuda:<index>")
    if not torch.cuda.is_available():
        raise FscsError(f"{ENV}={raw!r}: CUDA is not available here (torch {torch.__version__}); use cpu")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise FscsError(f"{ENV}={raw!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """What to record: ``cpu`` or ``cuda:<i> (<GPU name>)``."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on ``device`` for ``bf16``; nothing for ``fp32``."""
    if precision not in PRECISIONS:
        raise FscsError(f"backbone.precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timings); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
