"""Benchmark CST's support-axis attention: torch's scaled_dot_product_attention against the fused kernel.

    python -m benchmarks.attention [--batch 6] [--repeats 10] [--threads 1 2]

The problems are a training batch's (``--batch`` episodes x 256 query tokens x 8 heads): block 1 attends
from 10 pooled positions to 37 support positions with 4 dims per head, block 2 from 2 to 10 with 16 dims; a
random 30% of the support keys are masked (never the first). Both rows run in this process on the same
tensors. Columns: milliseconds per call (median of ``--repeats``) for forward with autograd, backward, and
forward without autograd (validation and evaluation), the ratio of SDPA's time to the kernel's, the largest
absolute difference of the outputs and gradients, and the peak RSS (Linux).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.train import peak_rss_mb
from fscs.core.allocator import keep_freed_memory
from fscs.learn.model.fused_attention import kernel, sdpa_attention, tiny_attention

BLOCKS = {"block 1 (10 x 37 x 4)": (10, 37, 4), "block 2 (2 x 10 x 16)": (2, 10, 16)}


def problems(n: int, nq: int, nk: int, d: int, heads: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, nq, heads, d, generator=g)
    kv = torch.randn(n, nk, 2, heads, d, generator=g)
    valid = torch.rand(n, nk, generator=g) > 0.3
    valid[:, 0] = True
    return q, kv, valid, torch.randn(n, nq, heads, d, generator=g)


def timings(fn, q, kv, valid, grad, repeats: int) -> tuple[list[float], list[torch.Tensor]]:
    """Median ms of (forward with autograd, backward, forward without) and (out, grad q, grad kv)."""
    q, kv = q.clone().requires_grad_(), kv.clone().requires_grad_()
    rows = []
    for _ in range(repeats + 1):  # the first call warms up
        q.grad = kv.grad = None
        t0 = time.perf_counter()
        out = fn(q, kv, valid)
        t1 = time.perf_counter()
        out.backward(grad)
        t2 = time.perf_counter()
        with torch.no_grad():
            fn(q, kv, valid)
        rows.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    ms = [1e3 * statistics.median(r[i] for r in rows[1:]) for i in range(3)]
    return ms, [out.detach(), q.grad, kv.grad]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=6, help="episodes per batch (train.batch_size)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the train and evaluate stages run
    kernel()  # built (or loaded) before any timing
    n = args.batch * 256
    print(f"CST attention, {n} (sample, query token) problems x 8 heads per call")
    print(
        "| block | threads | design | fwd ms | bwd ms | fwd no-grad ms | train ratio | no-grad ratio "
        "| max abs diff | peak RSS MB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, (nq, nk, d) in BLOCKS.items():
        tensors = problems(n, nq, nk, d)
        for threads in args.threads:
            torch.set_num_threads(threads)
            base, ref = timings(sdpa_attention, *tensors, args.repeats)
            ms, got = timings(tiny_attention, *tensors, args.repeats)
            diff = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
            for design, row in (("torch SDPA", base), ("fused kernel", ms)):
                ratio = (base[0] + base[1]) / (row[0] + row[1])
                print(
                    f"| {label} | {threads} | {design} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} | "
                    f"{ratio:.2f}x | {base[2] / row[2]:.2f}x | {diff if design != 'torch SDPA' else 0:.1e} | "
                    f"{peak_rss_mb():.0f} |"
                )


if __name__ == "__main__":
    main()
