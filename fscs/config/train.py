"""The ``train`` params section as `TrainConfig`: plain data, no torch, so the params layer
(`fscs.config.params`)
checks it without importing the training code. Its defaults live here only."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dc_fields
from typing import Any

from fscs.config.cst import CSTConfig
from fscs.config.supervision import SUPERVISIONS
from fscs.core.errors import FscsError


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 20
    episodes_per_epoch: int = 600
    batch_size: int = 12
    lr: float = 1e-3
    schedule: str = "constant"  # constant | cosine (linear warmup, then cosine decay to 0)
    warmup: float = 0.0  # fraction of the optimiser steps spent warming up linearly (cosine schedule)
    min_epochs: int = 1  # early stopping never ends training before this epoch
    # weight averaging: 0 = off (validate and keep the trained weights); d in (0, 1): validate and keep a
    # running mean of the weights of every step so far, which turns into an exponential moving average with
    # decay d once it spans 1 / (1 - d) steps (timm's ModelEmaV3, warmup power 1)
    ema: float = 0.0
    calibrate: bool = False  # choose decision thresholds on validation each epoch, select on calibrated mIoU
    cls_weight: float = 0.1
    label_size: int = 64
    patience: int = 5
    threads: int = 2
    eval_batch_size: int = 16
    model: dict[str, Any] = field(default_factory=dict)  # CSTConfig overrides: support_size, channels ...
    # supervision setting -> train keys that override the ones above for that setting's cells only
    # (``model`` merges key by key), e.g. {"image": {"model": {"prior": "prototype"}}}
    by_supervision: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> TrainConfig:
        """Validated config from params' ``train`` section (unknown keys are an error)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise FscsError(f"params: unknown keys in section 'train': {unknown} (known: {sorted(known)})")
        cfg = cls(**section)
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
        for name in ("lr", "cls_weight"):
            value = getattr(cfg, name)
            if (
                not (isinstance(value, int | float) and math.isfinite(value))
                or value < 0
                or (name == "lr" and value == 0)
            ):
                rule = "a finite number > 0" if name == "lr" else "a finite number >= 0"
                raise FscsError(f"params: train.{name} must be {rule}, got {value!r}")
        if int(cfg.patience) < 0:
            raise FscsError(f"params: train.patience must be >= 0, got {cfg.patience!r}")
        if cfg.schedule not in ("constant", "cosine"):
            raise FscsError(f"params: train.schedule must be 'constant' or 'cosine', got {cfg.schedule!r}")
        if not 0.0 <= float(cfg.warmup) < 1.0:
            raise FscsError(f"params: train.warmup must be in [0, 1), got {cfg.warmup!r}")
        if not 0.0 <= float(cfg.ema) < 1.0:
            raise FscsError(f"params: train.ema must be in [0, 1) (0 = off), got {cfg.ema!r}")
        if not isinstance(cfg.by_supervision, dict):
            raise FscsError(f"params: train.by_supervision must be a mapping, got {cfg.by_supervision!r}")
        for name in cfg.by_supervision:
            cfg.for_supervision(name)  # every setting's merged section must be valid on its own
        return cfg

    def for_supervision(self, supervision: str) -> TrainConfig:
        """The config one supervision setting's cells train with: ``by_supervision[supervision]`` applied
        (``model`` merged key by key), ``by_supervision`` itself emptied."""
        if supervision not in SUPERVISIONS:
            raise FscsError(
                f"params: train.by_supervision: unknown supervision {supervision!r} "
                f"(known: {', '.join(SUPERVISIONS)})"
            )
        override = self.by_supervision.get(supervision, {})
        if not isinstance(override, dict) or "by_supervision" in override:
            raise FscsError(
                f"params: train.by_supervision.{supervision} must map train keys to values, got {override!r}"
            )
        section = {k: v for k, v in asdict(self).items() if k != "by_supervision"}
        merged = {**section, **override, "model": {**section["model"], **override.get("model", {})}}
        try:
            return TrainConfig.from_params(merged)
        except FscsError as e:
            raise FscsError(f"{e} (in train.by_supervision.{supervision})") from None

    @property
    def steps(self) -> int:
        """Optimiser steps of a full run (every epoch, no early stop)."""
        return int(self.epochs) * math.ceil(int(self.episodes_per_epoch) / int(self.batch_size))
