"""Training CST on 1-way 1-shot episodes read from the feature store (never the backbone).

- Episodes: the FS-CS protocol (`fscs.data.episodes`) on the train split and the fold's training classes;
  epoch e uses a fixed stream from ``Generator(PCG64([seed, fold, e]))``, unrelated to the seeds of the
  validation episode list (``seed + i``), so training never replays the validation episodes verbatim.
- Supervision: `fscs.targets.Targets` (support masks, query targets, presence labels).
- Loss: ``cls_weight`` x CE(presence) + CE(segmentation, ignore 255), the segmentation logits upsampled
  bilinearly from 2x the token grid to ``label_size``. Adam, constant learning rate.
- Selection: after every epoch, mIoU on the fold's 1-way 1-shot VALIDATION episodes (train split, training
  classes; never the test list), via `fscs.evaluation.run_episodes` and `CSTPredictor`; the best epoch's
  weights are kept; training stops after ``patience`` epochs without improvement (counted only once the
  best validation mIoU is above 0, see `improves`).
- Determinism: ``torch.manual_seed(seed)``, ``torch.use_deterministic_algorithms(True)``, a fixed thread
  count; two runs with the same inputs give bit-identical weights on the same machine.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fscs.cst_predictor import CSTPredictor, TokenBank
from fscs.data.episodes import TrainEpisodeSampler
from fscs.errors import FscsError
from fscs.model.cst import CST, CSTConfig
from fscs.targets import Targets

CURVE_COLUMNS = ("epoch", "train_loss", "val_er", "val_miou", "seconds")


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 20
    episodes_per_epoch: int = 600
    batch_size: int = 12
    lr: float = 1e-3
    cls_weight: float = 0.1
    label_size: int = 112
    patience: int = 5
    threads: int = 2
    eval_batch_size: int = 16
    model: dict[str, Any] = field(default_factory=dict)  # CSTConfig overrides: support_size, channels ...

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> TrainConfig:
        """Validated config from params' ``train`` section (unknown keys are an error)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise FscsError(f"params: unknown keys in section 'train': {unknown} (known: {sorted(known)})")
        cfg = cls(**section)
        from dataclasses import fields as dc_fields

        model_keys = {f.name for f in dc_fields(CSTConfig)} - {
            "num_layers",
            "num_heads",
            "embed_dim",
            "grid",
            "backbone",
        }
        if not isinstance(cfg.model, dict) or set(cfg.model) - model_keys:
            raise FscsError(f"params: train.model takes the keys {sorted(model_keys)}, got {cfg.model!r}")
        for name in (
            "epochs",
            "episodes_per_epoch",
            "batch_size",
            "label_size",
            "threads",
            "eval_batch_size",
        ):
            if int(getattr(cfg, name)) < 1:
                raise FscsError(f"params: train.{name} must be >= 1, got {getattr(cfg, name)!r}")
        if int(cfg.patience) < 0:
            raise FscsError(f"params: train.patience must be >= 0, got {cfg.patience!r}")
        return cfg


def improves(score: float | None, best: float | None) -> bool:
    """Whether a validation mIoU is a new best. While no epoch has scored above 0 (the model still predicts
    all background, common in the first epochs), a later epoch counts as no worse, so the most trained of
    those is kept; early stopping only starts counting once the best mIoU is positive."""
    s = -1.0 if score is None else float(score)
    b = -1.0 if best is None else float(best)
    return s > b or (b <= 0.0 and s >= b)


def set_determinism(seed: int, threads: int) -> None:
    torch.manual_seed(int(seed))
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(threads))


def epoch_rng(seed: int, fold: int, epoch: int) -> np.random.Generator:
    """The episode stream of one epoch."""
    return np.random.Generator(np.random.PCG64([int(seed), int(fold), int(epoch)]))


def segmentation_loss(seg_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE over (bg, fg) logits (B, 2, h, w) upsampled to the target (B, S, S) size; 255 ignored.

    Mean over the non-ignored pixels of the batch (0 when there are none)."""
    logits = F.interpolate(seg_logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, target, ignore_index=255, reduction="sum")
    count = (target != 255).sum().clamp(min=1)
    return total / count


def episode_loss(
    model: CST,
    query: torch.Tensor,
    support: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    presence: torch.Tensor,
    cls_weight: float,
) -> torch.Tensor:
    cls_logits, seg_logits = model(query, support, mask)
    return cls_weight * F.cross_entropy(cls_logits, presence) + segmentation_loss(seg_logits, target)


def training_images(index: pd.DataFrame, split: str, classes: list[int]) -> list[str]:
    """Images of ``split`` having at least one of ``classes`` (every image a training episode can touch)."""
    wanted = set(int(c) for c in classes)
    rows = index[
        (index["split"] == split) & index["classes"].map(lambda cs: bool(wanted & set(map(int, cs))))
    ]
    return [str(i) for i in rows.index]


class Batcher:
    """Turns 1-way 1-shot episodes into tensors: tokens, support masks, query targets, presence labels."""

    def __init__(self, tokens: TokenBank, targets: Targets):
        self.tokens = tokens
        self.targets = targets

    def __call__(self, episodes: list[Any]) -> tuple[torch.Tensor, ...]:
        qs = [e.query_id for e in episodes]
        ss = [e.support_ids[0][0] for e in episodes]
        cs = [int(e.support_classes[0]) for e in episodes]
        t = self.targets
        masks = np.stack([t.support_mask(s, c) for s, c in zip(ss, cs, strict=True)])
        target = np.stack([t.query_target(q, s, c) for q, s, c in zip(qs, ss, cs, strict=True)])
        presence = [t.presence(q, c) for q, c in zip(qs, cs, strict=True)]
        return (
            self.tokens.get(qs),
            self.tokens.get(ss),
            torch.from_numpy(masks),
            torch.from_numpy(target.astype(np.int64)),
            torch.tensor(presence, dtype=torch.long),
        )


@dataclass
class TrainResult:
    model: CST  # the best epoch's weights
    best_epoch: int
    best_val_miou: float | None
    curve: list[dict[str, Any]]
    seconds: float


def validate(
    model: CST,
    tokens: TokenBank,
    targets: Targets,
    val_episodes: pd.DataFrame,
    index: pd.DataFrame,
    classes: list[int],
    void: str,
    batch_size: int,
) -> tuple[float | None, float | None]:
    """(ER, mIoU) of the model on validation episodes (1-way 1-shot rows), with the test-time mask rule."""
    from fscs.evaluation import run_episodes

    predictor = CSTPredictor(
        model, tokens, targets.test_support_mask, targets.test_mask_depends_on_class, batch_size=batch_size
    )
    predictor.prefetch(val_episodes, progress=False)
    res = run_episodes(val_episodes, predictor, index, classes, void=void, progress=False)
    r = res.get("1way1shot") or next(iter(res.values()))
    return r["er"], r["miou"]


def train(
    *,
    config: TrainConfig,
    tokens: TokenBank,
    model_config: CSTConfig,
    targets: Targets,
    index: pd.DataFrame,
    train_split: str,
    train_classes: list[int],
    fold: int,
    val_episodes: pd.DataFrame | None,
    void: str = "ignore",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train one CST model; returns the best epoch's model and the learning curve.

    ``val_episodes``: 1-way 1-shot validation rows of this fold (None or empty: keep the last epoch).
    """
    set_determinism(config.seed, config.threads)
    start = time.perf_counter()
    model = CST(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config.lr))
    sampler = TrainEpisodeSampler(
        index.reset_index(drop=True), train_classes, train_split, way=1, shot=1, seed=config.seed
    )
    batcher = Batcher(tokens, targets)
    has_val = val_episodes is not None and len(val_episodes) > 0
    best_state, best_epoch, best_miou, since_best = None, 0, None, 0
    curve: list[dict[str, Any]] = []
    per_epoch = int(config.episodes_per_epoch)
    bs = int(config.batch_size)
    for epoch in range(1, int(config.epochs) + 1):
        t0 = time.perf_counter()
        model.train()
        rng = epoch_rng(config.seed, fold, epoch)
        episodes = [sampler.sample(rng) for _ in range(per_epoch)]
        total, seen = 0.0, 0
        bar = tqdm(total=per_epoch, desc=f"epoch {epoch}", unit="ep", disable=None if progress else True)
        for b0 in range(0, per_epoch, bs):
            chunk = episodes[b0 : b0 + bs]
            q, s, m, target, presence = batcher(chunk)
            loss = episode_loss(model, q, s, m, target, presence, float(config.cls_weight))
            if not torch.isfinite(loss):
                raise FscsError(f"training diverged at epoch {epoch} (loss {loss.item()})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(chunk)
            seen += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(loss=f"{total / seen:.4f}")
        bar.close()
        val_er = val_miou = None
        if has_val:
            val_er, val_miou = validate(
                model, tokens, targets, val_episodes, index, train_classes, void, config.eval_batch_size
            )
        row = {
            "epoch": epoch,
            "train_loss": round(total / max(seen, 1), 6),
            "val_er": val_er,
            "val_miou": val_miou,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        curve.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if best_state is None or not has_val or improves(val_miou, best_miou):
            best_state = copy.deepcopy(model.state_dict())
            best_epoch, best_miou, since_best = epoch, val_miou, 0
        else:
            since_best += 1
            if since_best >= int(config.patience) > 0 and (best_miou or 0.0) > 0.0:
                break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, best_epoch, best_miou, curve, time.perf_counter() - start)
