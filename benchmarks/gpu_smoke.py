"""GPU smoke test: CUDA extraction matches the CPU, a CUDA training step is deterministic, throughput table.

    FSCS_DEVICE=cuda python -m benchmarks.gpu_smoke [--images 64] [--batch 32] [--steps 20]
    python -m benchmarks.gpu_smoke --device cpu --images 8 --batch 4 --steps 2      # dry run, no GPU
    python -m benchmarks.gpu_smoke --device cpu --tiny      # every cell at toy shapes (seconds; the tests)

For a lent GPU machine: needs torch, timm, h5py, numpy, pandas, pillow and tqdm, not pydantic, yaml, dvc
or prefect (it imports no params layer), nor the backbone weights: the backbone is DINOv2 ViT-S/14's timm
architecture at 224 with seeded random weights (same shapes and FLOPs as the default), plus the tiny
random ViT. Checks, each printed with its numbers:

- extraction on the device (``fscs.features.extraction.extract_to_store``: DataLoader workers, pinned memory,
  one copy back per batch) equals the CPU's timm-block extraction within tolerance, in fp32 and bf16;
- two CST training runs on the device from the same seed give identical losses and weights (under
  ``torch.use_deterministic_algorithms(True)``, `fscs.core.deterministic` stand-ins on CUDA);
- a throughput table: extraction images/s (fp32, bf16) and training episodes/s, device vs CPU;
- the paper-shaped cell: DINO ViT-S/8 at 400 px (12 blocks, 6 heads, width 384, 50 x 50 patches + CLS =
  2,501 tokens) and CST with a 12 x 12 support grid: random tokens of that shape through the CST training
  step (steps/s, peak GPU memory) and the episode predictor (episodes/s), and the online path's images/s
  (the random-weight ViT-S/8 created at 400 px, on the device).

``--tiny`` runs the same code at the tiny random ViT's shapes (3 blocks, 2 heads, width 48, 8 x 8 patches).

Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import timm
import torch

from benchmarks.extract import write_random_jpegs
from fscs.core.device import describe, resolve_device, synchronize
from fscs.features.backbone import Backbone, Provenance, create_backbone
from fscs.features.extraction import extract_to_store
from fscs.features.names import TINY
from fscs.learn.model.cst import CST, CSTConfig
from fscs.learn.predictor import CSTPredictor, TokenBank
from fscs.learn.train import episode_loss

#: max abs difference of tokens / cosine floor: device vs CPU, same precision
TOLERANCE = {"fp32": (1e-2, 0.9999), "bf16": (0.25, 0.99)}


@dataclass(frozen=True)
class Shapes:
    """A backbone (timm architecture at ``size`` px, or the tiny random ViT) and the CST sized for its
    tokens (``layers`` x (1 + gh*gw) x ``width``, ``heads`` heads), with label masks of ``label`` px."""

    arch: str
    size: int
    patch: int
    layers: int
    heads: int
    width: int
    support: int = 12
    pooled: int = 3
    label: int = 64

    @property
    def grid(self) -> tuple[int, int]:
        return (self.size // self.patch, self.size // self.patch)

    def cst(self) -> CSTConfig:
        return CSTConfig(
            num_layers=self.layers,
            num_heads=self.heads,
            embed_dim=self.width,
            grid=self.grid,
            support_size=self.support,
            pooled_grid=self.pooled,
        )


#: the default backbone: DINOv2 ViT-S/14 at 224 (16 x 16 patches)
DEFAULT = Shapes("vit_small_patch14_dinov2", 224, 14, 12, 6, 384)
#: the paper's: DINO ViT-S/8 at 400 px (50 x 50 patches + CLS = 2,501 tokens), 12 x 12 support grid
PAPER = Shapes("vit_small_patch8_224", 400, 8, 12, 6, 384, label=400)
#: ``--tiny``: the tiny random ViT (`fscs.features.backbone.TINY_CONFIG`) at 64 px (8 x 8 patches)
TOY = Shapes(TINY, 64, 8, 3, 2, 48, support=4, pooled=2, label=16)


def random_backbone(shapes: Shapes, device: torch.device, precision: str) -> Backbone:
    """The backbone of ``shapes`` with seeded random weights (no download), timm's blocks (not fused)."""
    if shapes.arch == TINY:
        return create_backbone(TINY, shapes.size, fused=False, device=device, precision=precision)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(shapes.arch, pretrained=False, num_classes=0, img_size=shapes.size)
    prov = Provenance(
        f"{shapes.arch}_random",
        shapes.arch,
        "random",
        "seed 0",
        shapes.patch,
        shapes.width,
        shapes.heads,
        shapes.layers,
    )
    return Backbone(model, prov, shapes.size, fused=False, device=device, precision=precision)


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


def random_episodes(
    shapes: Shapes, batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random (query + support) float16 tokens (2B, L, 1+P, D) and the support masks, query targets
    (a void band) and presence labels of B episodes, all on ``device``."""
    g = torch.Generator().manual_seed(0)
    n = 1 + shapes.grid[0] * shapes.grid[1]
    tokens = torch.randn(2 * batch, shapes.layers, n, shapes.width, generator=g).half()
    mask = torch.rand(batch, shapes.label, shapes.label, generator=g) > 0.5
    target = (torch.rand(batch, shapes.label, shapes.label, generator=g) > 0.5).long()
    target[:, :4] = 255
    presence = torch.randint(0, 2, (batch,), generator=g)
    return tuple(t.to(device) for t in (tokens, mask, target, presence))


def train_steps(
    device: torch.device, shapes: Shapes, steps: int, batch: int
) -> tuple[list[float], CST, float]:
    """Losses, the trained model and steps/s of ``steps`` Adam steps of a CST on fixed random episodes."""
    tokens, mask, target, presence = random_episodes(shapes, batch, device)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model = CST(shapes.cst()).to(device)
    with torch.no_grad():
        q = model.prepare_query(tokens[:batch])
        s = model.prepare_support(tokens[batch:])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = episode_loss(model, q, s, mask, target, presence, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    synchronize(device)
    rate = steps / (time.perf_counter() - t0)
    return [float(v) for v in losses], model, rate


def train_run(
    device: torch.device, steps: int, batch: int, shapes: Shapes = DEFAULT
) -> tuple[list[float], dict[str, torch.Tensor], float]:
    """Losses, final weights and episodes/s of ``steps`` Adam steps of a CST of ``shapes`` on fixed data."""
    losses, model, rate = train_steps(device, shapes, steps, batch)
    return losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, rate * batch


class _RandomStore:
    """A feature store stand-in holding seeded random float16 tokens for images ``0`` .. ``n - 1``."""

    def __init__(self, shapes: Shapes, n: int):
        g = torch.Generator().manual_seed(1)
        size = (n, shapes.layers, 1 + shapes.grid[0] * shapes.grid[1], shapes.width)
        self._tokens = torch.randn(size, generator=g).half().numpy()

    def __contains__(self, image_id: object) -> bool:
        return str(image_id).isdigit() and int(str(image_id)) < len(self._tokens)

    def tokens(self, image_id: str) -> np.ndarray:
        return self._tokens[int(image_id)]


def paper_cell(
    device: torch.device, shapes: Shapes, steps: int, batch: int, episodes: int, images: int
) -> dict[str, float | None]:
    """The CST training step and the episode predictor on random tokens of ``shapes``, and the online
    path (the random-weight backbone on random images): steps/s, peak GPU memory (GiB; None off CUDA),
    episodes/s and images/s."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    train_steps(device, shapes, 1, batch)  # warm-up: kernels, allocator
    _, model, steps_per_s = train_steps(device, shapes, steps, batch)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    mask = np.random.default_rng(0).random((shapes.label, shapes.label)) > 0.5
    n = max(2, min(episodes, 16))
    predictor = CSTPredictor(
        model, TokenBank(_RandomStore(shapes, n)), lambda s, c: mask, False, batch_size=batch
    )
    predictor.predict("0", [1], [["1"]])  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    for e in range(episodes):  # every (query, support) pair new: the predictor's pair cache never hits
        predictor.predict(str(e % n), [1 + e // n], [[str((e + 1) % n)]])
    synchronize(device)
    episodes_per_s = episodes / (time.perf_counter() - t0)
    del model, predictor
    bb = random_backbone(shapes, device, "fp32")
    x = torch.randn(images, 3, shapes.size, shapes.size, generator=torch.Generator().manual_seed(2))
    bb.extract(x[:1])  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    bb.extract(x).to_host()[0]
    synchronize(device)
    images_per_s = images / (time.perf_counter() - t0)
    return {
        "steps_per_s": steps_per_s,
        "peak_gib": peak,
        "episodes_per_s": episodes_per_s,
        "images_per_s": images_per_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device", default=None, help="auto | cuda | cuda:i | cpu (default: $FSCS_DEVICE or auto)"
    )
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="training steps per run on the device")
    ap.add_argument("--cpu-steps", type=int, default=3, help="training steps timed on the CPU")
    ap.add_argument("--paper-steps", type=int, default=10, help="paper cell: CST training steps timed")
    ap.add_argument("--paper-batch", type=int, default=4, help="paper cell: episodes per training step")
    ap.add_argument("--paper-episodes", type=int, default=32, help="paper cell: predictor episodes timed")
    ap.add_argument("--paper-images", type=int, default=16, help="paper cell: online-path images timed")
    ap.add_argument("--tiny", action="store_true", help="every cell at the tiny random ViT's shapes")
    args = ap.parse_args(argv)
    base, paper = (TOY, TOY) if args.tiny else (DEFAULT, PAPER)
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
                random_backbone(base, cpu, precision), paths, Path(tmp) / f"cpu-{precision}.h5", args.batch
            )
            bb = random_backbone(base, device, precision)
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

    la, wa, train_rate = train_run(device, args.steps, args.batch // 2 or 1, base)
    lb, wb, _ = train_run(device, args.steps, args.batch // 2 or 1, base)
    same = la == lb and all(torch.equal(wa[k], wb[k]) for k in wa)
    check("training deterministic", same, f"{args.steps} steps, losses {la[0]:.4f} -> {la[-1]:.4f}")
    lc, _, cpu_train_rate = train_run(cpu, args.cpu_steps, args.batch // 2 or 1, base)
    gap = max(abs(a - b) for a, b in zip(la, lc, strict=False))
    check("training loss device vs cpu", gap < 1e-2, f"max loss difference {gap:.2e} over {len(lc)} steps")

    print(f"\n{'throughput':34} {'cpu':>9} {device.type:>9} {'ratio':>7}")
    for precision in ("fp32", "bf16"):
        c, d = rates[("cpu", precision)], rates[("dev", precision)]
        print(f"{'extraction ' + precision + ' (images/s)':34} {c:9.1f} {d:9.1f} {d / c:6.1f}x")
    c, d = cpu_train_rate, train_rate
    print(f"{'training (episodes/s)':34} {c:9.1f} {d:9.1f} {d / c:6.1f}x")

    cell = paper_cell(
        device, paper, args.paper_steps, args.paper_batch, args.paper_episodes, args.paper_images
    )
    tokens = f"{paper.layers} x {1 + paper.grid[0] * paper.grid[1]} x {paper.width}"
    print(
        f"\npaper cell on {device.type}: {paper.arch} at {paper.size} px ({tokens} tokens), {paper.support}"
        f"x{paper.support} support grid, batch {args.paper_batch}"
    )
    peak = "n/a (not CUDA)" if cell["peak_gib"] is None else f"{cell['peak_gib']:.2f} GiB"
    print(f"  CST training: {cell['steps_per_s']:.2f} steps/s, peak GPU memory {peak}")
    print(f"  episode predictor: {cell['episodes_per_s']:.1f} episodes/s")
    print(f"  online path (backbone on the device): {cell['images_per_s']:.1f} images/s")
    print(f"\n{len(failures)} failed check(s)" + (f": {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
