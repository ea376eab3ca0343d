"""GPU smoke test: CUDA extraction matches the CPU, a CUDA training step is deterministic, throughput table.

    FSCS_DEVICE=cuda python -m benchmarks.gpu_smoke [--images 64] [--batch 32] [--steps 20]
    python -m benchmarks.gpu_smoke --device cpu --images 8 --batch 4 --steps 2      # dry run, no GPU

For a lent GPU machine: needs torch, timm, h5py, numpy, pandas, pillow and tqdm, not pydantic, yaml, dvc
or prefect (it imports no params layer), nor the backbone weights: the backbone is DINOv2 ViT-S/14's timm
architecture at 224 with seeded random weights (same shapes and FLOPs as the default), plus the tiny
random ViT. Checks, each printed with its numbers:

- extraction on the device (``fscs.features.extraction.extract_to_store``: DataLoader workers, pinned memory,
  one copy back per batch) equals the CPU's timm-block extraction within tolerance, in fp32 and bf16;
- two CST training runs on the device from the same seed give identical losses and weights (under
  ``torch.use_deterministic_algorithms(True)``, `fscs.core.deterministic` stand-ins on CUDA);
- a throughput table: extraction images/s (fp32, bf16) and training episodes/s, device vs CPU.

Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import timm
import torch

from benchmarks.extract import write_random_jpegs
from fscs.core.device import describe, resolve_device, synchronize
from fscs.features.backbone import Backbone, Provenance, create_backbone
from fscs.features.extraction import extract_to_store
from fscs.learn.model.cst import CST, CSTConfig
from fscs.learn.train import episode_loss

ARCH = "vit_small_patch14_dinov2"  # the default backbone's architecture
SIZE = 224
#: max abs difference of tokens / cosine floor: device vs CPU, same precision
TOLERANCE = {"fp32": (1e-2, 0.9999), "bf16": (0.25, 0.99)}


def random_vits14(device: torch.device, precision: str) -> Backbone:
    """DINOv2 ViT-S/14 at 224 with seeded random weights (no download)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=SIZE)
    prov = Provenance("vits14_random", ARCH, "random", "seed 0", 14, 384, 6, 12)
    return Backbone(model, prov, SIZE, fused=False, device=device, precision=precision)


def extract(bb: Backbone, paths: list[str], out: Path, batch: int) -> tuple[dict[str, np.ndarray], float]:
    """Store arrays and images/s of one `extract_to_store` run."""
    ids = [Path(p).stem for p in paths]
    synchronize(bb.device)
    t0 = time.perf_counter()
    extract_to_store(bb, ids, paths, out, batch_size=batch, progress=False, check=False)
    synchronize(bb.device)
    rate = len(paths) / (time.perf_counter() - t0)
    with h5py.File(out) as f:
        arrays = {k: f[k][:].astype(np.float32) for k in ("tokens", "cls_query", "patch_keys")}
    return arrays, rate


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float]:
    """Max abs difference and min cosine (over last-axis vectors) of all arrays."""
    max_abs, cos_min = 0.0, 1.0
    for k in a:
        x, y = a[k], b[k]
        max_abs = max(max_abs, float(np.abs(x - y).max()))
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-12)
        cos_min = min(cos_min, float(cos.min()))
    return max_abs, cos_min


def train_run(
    device: torch.device, steps: int, batch: int
) -> tuple[list[float], dict[str, torch.Tensor], float]:
    """Losses, final weights and episodes/s of ``steps`` Adam steps of a default-sized CST on fixed data."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2 * batch, 12, 1 + 256, 384, generator=g).half()
    mask = torch.rand(batch, 64, 64, generator=g) > 0.5
    target = (torch.rand(batch, 64, 64, generator=g) > 0.5).long()
    target[:, :4] = 255
    presence = torch.randint(0, 2, (batch,), generator=g)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model = CST(CSTConfig(num_layers=12, num_heads=6, embed_dim=384, grid=(16, 16))).to(device)
    with torch.no_grad():
        q = model.prepare_query(tokens[:batch].to(device))
        s = model.prepare_support(tokens[batch:].to(device))
    mask, target, presence = mask.to(device), target.to(device), presence.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = episode_loss(model, q, s, mask, target, presence, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    synchronize(device)
    rate = steps * batch / (time.perf_counter() - t0)
    return losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device", default=None, help="auto | cuda | cuda:i | cpu (default: $FSCS_DEVICE or auto)"
    )
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="training steps per run on the device")
    ap.add_argument("--cpu-steps", type=int, default=3, help="training steps timed on the CPU")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)  # first: sets CUBLAS_WORKSPACE_CONFIG before any cuBLAS call
    cpu = torch.device("cpu")
    print(f"device {describe(device)}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}")
    failures: list[str] = []

    def check(name: str, ok: bool, detail: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            failures.append(name)

    tiny = create_backbone("vit_tiny_random", 64, fused=False).extract(torch.randn(2, 3, 64, 64))
    tiny_dev = create_backbone("vit_tiny_random", 64, device=device).extract(torch.randn(2, 3, 64, 64))
    check("tiny ViT shapes", tiny.tokens.shape == tiny_dev.cpu().tokens.shape, str(tuple(tiny.tokens.shape)))

    rates: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_random_jpegs(Path(tmp), args.images)
        for precision in ("fp32", "bf16"):
            ref, rates[("cpu", precision)] = extract(
                random_vits14(cpu, precision), paths, Path(tmp) / f"cpu-{precision}.h5", args.batch
            )
            bb = random_vits14(device, precision)
            extract(
                bb, paths[: args.batch], Path(tmp) / f"warm-{precision}.h5", args.batch
            )  # kernels, workers
            got, rates[("dev", precision)] = extract(bb, paths, Path(tmp) / f"dev-{precision}.h5", args.batch)
            max_abs, cos_min = compare(ref, got)
            tol_abs, tol_cos = TOLERANCE[precision]
            check(
                f"extraction {precision} {device.type} vs cpu",
                max_abs <= tol_abs and cos_min >= tol_cos,
                f"max abs {max_abs:.2e} (<= {tol_abs}), cosine min {cos_min:.6f} (>= {tol_cos})",
            )

    la, wa, train_rate = train_run(device, args.steps, args.batch // 2 or 1)
    lb, wb, _ = train_run(device, args.steps, args.batch // 2 or 1)
    same = la == lb and all(torch.equal(wa[k], wb[k]) for k in wa)
    check("training deterministic", same, f"{args.steps} steps, losses {la[0]:.4f} -> {la[-1]:.4f}")
    lc, _, cpu_train_rate = train_run(cpu, args.cpu_steps, args.batch // 2 or 1)
    gap = max(abs(a - b) for a, b in zip(la, lc, strict=False))
    check("training loss device vs cpu", gap < 1e-2, f"max loss difference {gap:.2e} over {len(lc)} steps")

    print(f"\n{'throughput':34} {'cpu':>9} {device.type:>9} {'ratio':>7}")
    for precision in ("fp32", "bf16"):
        c, d = rates[("cpu", precision)], rates[("dev", precision)]
        print(f"{'extraction ' + precision + ' (images/s)':34} {c:9.1f} {d:9.1f} {d / c:6.1f}x")
    c, d = cpu_train_rate, train_rate
    print(f"{'training (episodes/s)':34} {c:9.1f} {d:9.1f} {d / c:6.1f}x")
    print(f"\n{len(failures)} failed check(s)" + (f": {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
