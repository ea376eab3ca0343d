"""CST's support-axis attention as one CPU kernel: thousands of tiny masked heads, forward and backward fused.

torch's `scaled_dot_product_attention` on the CPU is built for long sequences; CST's block 1 runs about 12k
problems of 10 queries x 37 keys x 4 dims per training batch, where its per-problem overhead made attention
43% of a training step. The kernel (`tiny_attention.cpp`) is compiled for this machine on first use by
torch's C++ extension loader (g++ and ninja; cached in `build_directory`, under ``$TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``) and loaded once per process. ``train.model.attention: sdpa``
keeps torch's op.

    fscs kernel     # build (or find) the kernel and check it against torch's op (`make setup` runs it)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fscs.core.errors import FscsError

SOURCE = Path(__file__).with_name("tiny_attention.cpp")
NAME = "fscs_tiny_attention"
#: -march=native: built for the CPU it runs on; -ffast-math: vector expf and reductions (see the source)
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

_lock = threading.Lock()
_kernel: Any = None


def kernel() -> Any:
    """The compiled extension module (built on the first call on a machine, then loaded from the cache)."""
    global _kernel
    if _kernel is not None:  # every forward and backward asks: no lock once loaded
        return _kernel
    with _lock:
        if _kernel is None:
            _kernel = _build()
        return _kernel


@functools.cache
def native_target() -> str:
    """What ``-march=native`` means here, as the C++ compiler torch builds with resolves it (its target
    options: the CPU model and each instruction set on or off); "" when the compiler cannot be run.

    A build made for one CPU must never be loaded on another (a home folder shared by cluster nodes of
    different generations): AVX-512 code on an AVX2-only CPU dies of an illegal instruction."""
    from torch.utils.cpp_extension import get_cxx_compiler

    try:
        done = subprocess.run(
            [get_cxx_compiler(), "-march=native", "-Q", "--help=target"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def build_directory(source: bytes | None = None) -> Path:
    """Where the kernel is built: one folder per (source, flags, CPU target, torch, Python), whatever the
    project's path.

    torch's loader rebuilds (30 s) whenever the source path in its build file changes, so builds from two
    copies of the project (DVC experiments, the test suite's temporary repositories, Dask workspaces) would
    keep rebuilding one folder; the source is built from a copy inside the folder instead."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    parts = [*CFLAGS, native_target(), torch.__version__, sys.version]
    key = "\0".join(parts).encode() + (source or SOURCE.read_bytes())
    return root / f"{NAME}_{hashlib.sha256(key).hexdigest()[:16]}"


def _build() -> Any:
    import ninja

    # always the `ninja` wheel's binary: another ninja version rewrites the build log and rebuilds (30 s)
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns about CUDA_HOME, which a CPU kernel never uses
    try:
        from torch.utils.cpp_extension import load

        text = SOURCE.read_bytes()
        folder = build_directory(text)
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / SOURCE.name
        if not source.is_file() or source.read_bytes() != text:
            tmp = folder / f".{SOURCE.name}.{os.getpid()}"
            tmp.write_bytes(text)
            tmp.replace(source)  # atomic: concurrent first builds see a whole file
        return load(
            folder.name,
            [str(source)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - compiler, ninja or linker: all mean "no kernel here"
        raise FscsError(
            f"{SOURCE}: could not build the fused attention kernel ({type(exc).__name__}: {exc}); "
            "it needs g++ and ninja (pip install ninja). Set train.model.attention: sdpa to use torch's "
            "attention instead (same model, numbers differ in the last bits)"
        ) from exc
    finally:
        log.setLevel(level)


class _TinyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, kv: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        out, probs = kernel().forward(q, kv, key_valid, True)
        ctx.save_for_backward(q, kv, probs)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        q, kv, probs = ctx.saved_tensors
        grad_q, grad_kv = kernel().backward(grad_out.contiguous(), q, kv, probs)
        return grad_q, grad_kv, None


def _require_cpu(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor off the CPU by name before the kernel reads its memory (the kernel checks too)."""
    if t.device.type != "cpu":
        raise ValueError(
            f"tiny_attention: {name} is on {t.device}, but the fused kernel runs on the CPU only "
            "(use sdpa_attention on other devices)"
        )


def tiny_attention(q: torch.Tensor, kv: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention with plain dot-product logits, one problem per (sample, head).

    q (N, nq, H, d), kv (N, nk, 2, H, d) (keys, then values), key_valid (N, nk) bool with key 0 valid
    -> (N, nq, H, d). float32 on the CPU; differentiable in q and kv."""
    for name, t in (("q", q), ("kv", kv), ("key_valid", key_valid)):
        _require_cpu(name, t)
    q, kv = q.contiguous(), kv.contiguous()
    valid = key_valid.to(torch.uint8).contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        return _TinyAttention.apply(q, kv, valid)
    return kernel().forward(q, kv, valid, False)[0]


def sdpa_attention(q: torch.Tensor, kv: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """The same attention with torch's `scaled_dot_product_attention` (any device)."""
    n, nk = key_valid.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        kv[:, :, 0].transpose(1, 2),
        kv[:, :, 1].transpose(1, 2),
        attn_mask=key_valid.view(n, 1, 1, nk),
        scale=1.0,  # no 1/sqrt(d)
    )
    return out.transpose(1, 2)


def add_arguments(parser: Any) -> None:
    """`fscs kernel` takes no arguments."""


def run(args: Any) -> None:
    """Build (or load) the kernel, then compare it with torch's attention on random problems."""
    t0 = time.perf_counter()
    kernel()
    print(f"fused attention kernel ready in {time.perf_counter() - t0:.1f}s (built in {build_directory()})")
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(64, 10, 8, 4, generator=g), torch.randn(64, 37, 2, 8, 4, generator=g)
    valid = torch.rand(64, 37, generator=g) > 0.5
    valid[:, 0] = True
    diff = (tiny_attention(q, kv, valid) - sdpa_attention(q, kv, valid)).abs().max().item()
    print(f"max abs difference to torch's attention on random problems: {diff:.1e}")
    if not diff < 1e-4:
        raise FscsError(f"{SOURCE}: the fused attention kernel disagrees with torch's attention ({diff:.1e})")
