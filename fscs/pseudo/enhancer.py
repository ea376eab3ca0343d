"""The pseudo-label enhancer (PLE) of the mixed setting (METHOD.md section 4).

Conv3x3(H->128), ReLU, Conv3x3(128->128), ReLU, Conv3x3(128->1), padding 1, sigmoid: it maps the H per-head
cosine maps of the last block (H = 6 for ViT-S) at token-grid resolution to a foreground probability at the
same resolution. It is class-agnostic; it is trained on the labelled subset against GT masks, with one
sample per (image, class) pair:

- a *self* sample: the image's own per-head self cosine maps -> GT == c (the support pseudo-mask's job);
- a *pair* sample: the cosine maps of another training image's CLS query (an image labelled with c) against
  this image's keys -> GT == c (the query pseudo-mask's job; the support's CLS carries the class).

The loss (BCE, optionally + soft dice) is computed at ``label_size`` x ``label_size``: the logits are
upsampled bilinearly, the GT mask resized with nearest neighbour, void (255) ignored. Adam, a fixed
number of steps, random horizontal flips. Seeded; runs with ``torch.use_deterministic_algorithms(True)``.
The choices (loss, steps, inputs, one enhancer per fold) are measured in reports/enhancer.json (study:
`fscs.pseudo.enhancer_study`); results in reports/CHOICES.md.
"""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fscs.config.params import EnhancerConfig
from fscs.core.deterministic import interpolate_bilinear
from fscs.core.device import resolve_device
from fscs.core.errors import FscsError
from fscs.core.io import json_attr, load_torch, save_torch
from fscs.core.iou import IoUCounter
from fscs.core.resample import bilinear, nearest
from fscs.data.images import VOID

#: The enhancer's own settings, defaults from `fscs.config.params.EnhancerConfig` (the section's other keys
# are the
#: enhancer stage's). threshold: a number, or "auto": the grid value with the best IoU on the training
#: samples; scale: input maps upsampled bilinearly by this factor (the output is at the scaled size).
DEFAULT_CONFIG: dict[str, Any] = EnhancerConfig().model_dump(
    include={
        "in_channels",
        "width",
        "threshold",
        "threshold_grid",
        "scale",
        "loss",
        "steps",
        "batch_size",
        "lr",
        "weight_decay",
        "label_size",
        "flip",
        "seed",
    }
)


class Enhancer(nn.Module):
    """Conv3x3(in->w) ReLU Conv3x3(w->w) ReLU Conv3x3(w->1); ``forward`` gives logits; masks are
    ``sigmoid(logits) >= threshold`` (0.5, or calibrated on the labelled subset by ``train_enhancer``).

    With ``scale`` > 1 the input maps are first upsampled bilinearly by that factor (output at that size)."""

    def __init__(
        self, in_channels: int = 6, width: int = 128, threshold: float = 0.5, scale: int = 1
    ) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.scale = int(scale)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, gh, gw) per-head cosine maps -> (B, 1, scale*gh, scale*gw) logits."""
        if self.scale != 1:
            x = interpolate_bilinear(x, scale_factor=self.scale)
        return self.net(x)


def enhance(model: Enhancer, cos_maps: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Foreground probabilities (B, s*gh, s*gw) float32 from cosine maps (B, H, gh, gw); s = model.scale."""
    x = np.asarray(cos_maps, dtype=np.float32)
    if x.ndim != 4:
        raise FscsError(f"enhance: expected (B, H, gh, gw) cosine maps, got shape {x.shape}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(x[start : start + batch_size]).to(device)
            out.append(torch.sigmoid(model(batch))[:, 0].cpu().numpy())
    model.train(was_training)
    return np.concatenate(out, axis=0) if out else np.zeros((0, *x.shape[2:]), np.float32)


def binary_target(gt: np.ndarray, class_id: int, size: int) -> np.ndarray:
    """uint8 (size, size) target: 1 where gt == class_id, 255 where void, else 0."""
    small = nearest(gt, size)
    out = (small == class_id).astype(np.uint8)
    out[small == VOID] = VOID
    return out


def _loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    valid = (target != VOID).float()
    y = (target == 1).float()
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    loss = (bce * valid).sum() / valid.sum().clamp_min(1.0)
    if kind == "bce_dice":
        p = torch.sigmoid(logits) * valid
        inter = (p * y).sum(dim=(1, 2))
        denom = p.sum(dim=(1, 2)) + (y * valid).sum(dim=(1, 2))
        loss = loss + (1.0 - (2.0 * inter + 1.0) / (denom + 1.0)).mean()
    elif kind != "bce":
        raise FscsError(f"enhancer.loss must be 'bce' or 'bce_dice', got {kind!r}")
    return loss


def train_enhancer(
    inputs: np.ndarray,
    targets: np.ndarray,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    device: torch.device | None = None,
) -> tuple[Enhancer, list[float]]:
    """Train a fresh enhancer on (N, H, gh, gw) cosine maps and (N, L, L) uint8 targets {0, 1, 255}.

    Returns the model (eval mode, on ``device``: default `fscs.core.device.resolve_device`) and the mean loss
    of each block of 50 steps. Seeded and deterministic (the batch order and flips are drawn on the CPU).
    """
    device = resolve_device() if device is None else device
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    x_all = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    y_all = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.uint8)).long()
    if x_all.ndim != 4 or y_all.ndim != 3 or len(x_all) != len(y_all) or len(x_all) == 0:
        raise FscsError(f"train_enhancer: bad sample shapes {tuple(x_all.shape)} / {tuple(y_all.shape)}")
    label_size = int(y_all.shape[-1])
    x_all, y_all = x_all.to(device), y_all.to(device)
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(int(cfg["seed"]))
        gen = torch.Generator().manual_seed(int(cfg["seed"]))
        fixed = cfg["threshold"] != "auto"
        start_threshold = float(cfg["threshold"]) if fixed else 0.5
        model = Enhancer(int(x_all.shape[1]), int(cfg["width"]), start_threshold, int(cfg["scale"])).to(
            device
        )
        opt = torch.optim.Adam(
            model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"])
        )
        n, bs = len(x_all), int(cfg["batch_size"])
        order = torch.randperm(n, generator=gen)
        pos = 0
        history, running = [], []
        steps = int(cfg["steps"])
        bar = None
        if progress:
            bar = tqdm(total=steps, desc="enhancer", disable=None, leave=False)
        model.train()
        for _step in range(steps):
            if pos + bs > n:
                order = torch.randperm(n, generator=gen)
                pos = 0
            idx = order[pos : pos + bs]
            pos += bs
            x, y = x_all[idx.to(device)], y_all[idx.to(device)]
            if cfg["flip"]:
                flip = (torch.rand(len(idx), generator=gen) < 0.5).to(device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                y = torch.where(flip[:, None, None], y.flip(-1), y)
            logits = model(x)
            logits = interpolate_bilinear(logits, size=(label_size, label_size))
            loss = _loss(logits[:, 0], y, str(cfg["loss"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running.append(float(loss.detach()))
            if len(running) == 50:
                history.append(float(np.mean(running)))
                running = []
            if bar is not None:
                bar.update(1)
        if running:
            history.append(float(np.mean(running)))
        if bar is not None:
            bar.close()
    finally:
        torch.use_deterministic_algorithms(prev_det)
    model.eval()
    if not fixed:
        model.threshold = calibrate_threshold(model, inputs, targets, cfg["threshold_grid"])
    return model, history


def calibrate_threshold(model: Enhancer, inputs: np.ndarray, targets: np.ndarray, grid: list[float]) -> float:
    """The grid threshold with the best pooled IoU (void ignored) of the model's maps against ``targets``
    (N, L, L) at the targets' resolution; ties go to the lower threshold."""
    probs = enhance(model, inputs)
    size = targets.shape[-2:]
    counter = IoUCounter(sorted(float(t) for t in grid))
    for p, y in zip(probs, np.asarray(targets), strict=True):
        counter.add("all", bilinear(p, size), y == 1, y != VOID)
    ious = [counter.iou("all", i) or 0.0 for i in range(len(counter.thresholds))]
    return counter.thresholds[int(np.argmax(ious))]


# ------------------------------------------------------------------------------------------ checkpoints
def save_enhancer(path: str | os.PathLike, models: dict[str, Enhancer], config: dict[str, Any]) -> None:
    """Save {"state_dict": {name: state_dict}, "config": config} to ``path`` (atomic, reproducible bytes).

    ``models`` maps a name (``fold0`` ... or ``all``) to a trained enhancer; their mask thresholds and
    input scale go into ``config["thresholds"]`` / ``config["scale"]``."""
    state = {
        name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for name, m in models.items()
    }
    config = {**config, "thresholds": {name: float(m.threshold) for name, m in models.items()}}
    config["scale"] = int(next(iter(models.values())).scale) if models else int(config.get("scale", 1))
    save_torch({"state_dict": state, "config": config}, path)


def fold_entry(names: Any, fold: int | str | None, missing: str) -> str:
    """Which per-fold entry (``fold<f>``) of a checkpoint or file serves ``fold``: the fold's own, else the
    overall ``all``, else the only one when no fold is asked; FscsError ``"{missing} for fold ..."``."""
    names = sorted(names)
    if fold is not None and f"fold{fold}" in names:
        return f"fold{fold}"
    if "all" in names:
        return "all"
    if fold is None and len(names) == 1:
        return names[0]
    raise FscsError(f"{missing} for fold {fold!r} (holds {names})")


def load_enhancer(path: str | os.PathLike, fold: int | str | None = None) -> Enhancer:
    """Load one enhancer from a checkpoint (weights_only=True): the fold's when it holds one per fold."""
    if not os.path.isfile(path):
        raise FscsError(f"{path}: enhancer checkpoint not found")
    ckpt = load_torch(path, "enhancer checkpoint")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise FscsError(f"{path}: not an enhancer checkpoint (needs 'state_dict' and 'config')")
    states, cfg = ckpt["state_dict"], ckpt["config"]
    name = fold_entry(states, fold, f"{path}: no enhancer")
    model = Enhancer(
        int(cfg.get("in_channels", 6)),
        int(cfg.get("width", 128)),
        float(cfg.get("thresholds", {}).get(name, 0.5)),
        int(cfg.get("scale", 1)),
    )
    model.load_state_dict(states[name])
    model.eval()
    return model


# ------------------------------------------------------------------------------- enhanced pseudo-labels
def write_enhanced(
    path: str | os.PathLike,
    image_ids: list[str],
    maps: dict[str, np.ndarray],
    labelled_ids: list[str],
    attrs: dict[str, Any],
) -> None:
    """Write ``image_ids``, one ``enhanced/<name>`` (N, gh, gw) float16 per enhancer, ``labelled_ids``."""
    with h5py.File(path, "w") as f:
        f.create_dataset("image_ids", data=np.array(image_ids, dtype=object), dtype=h5py.string_dtype())
        grp = f.create_group("enhanced")
        for name, m in maps.items():
            grp.create_dataset(name, data=np.asarray(m, dtype=np.float16))
        f.create_dataset(
            "labelled_ids", data=np.array(sorted(labelled_ids), dtype=object), dtype=h5py.string_dtype()
        )
        for key, value in attrs.items():
            f.attrs[key] = json_attr(value)


def _ids(dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in dataset[()]]


def read_labelled_ids(path: str | os.PathLike) -> set[str]:
    """The labelled subset (image ids whose GT masks the mixed setting uses) from an enhanced pseudo file."""
    if not os.path.isfile(path):
        raise FscsError(f"{path}: enhanced pseudo-label file not found")
    try:
        with h5py.File(path, "r") as f:
            if "labelled_ids" not in f:
                raise FscsError(f"{path}: no 'labelled_ids' dataset (not an enhanced pseudo-label file)")
            return set(_ids(f["labelled_ids"]))
    except OSError as exc:
        raise FscsError(f"{path}: not a readable HDF5 file ({exc})") from exc


def read_enhanced(path: str | os.PathLike, fold: int | str | None = None) -> tuple[list[str], np.ndarray]:
    """(image_ids, enhanced self maps (N, gh, gw) float16) for ``fold`` (or the single/overall enhancer)."""
    if not os.path.isfile(path):
        raise FscsError(f"{path}: enhanced pseudo-label file not found")
    with h5py.File(path, "r") as f:
        if "enhanced" not in f:
            raise FscsError(f"{path}: no 'enhanced' group (not an enhanced pseudo-label file)")
        name = fold_entry(f["enhanced"], fold, f"{path}: no enhanced maps")
        return _ids(f["image_ids"]), f["enhanced"][name][()]
