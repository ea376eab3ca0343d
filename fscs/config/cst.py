"""CST model sizes and inference rules (`CSTConfig`): plain data, no torch, so the params layer can check
``train.model`` without importing the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

KSHOT_RULES = ("mean_prob", "mean_logit", "joint")
PRIORS = ("none", "prototype")
ATTENTIONS = ("fused", "sdpa")


@dataclass
class CSTConfig:
    """Model sizes. ``num_layers``, ``num_heads``, ``embed_dim`` and ``grid`` come from the feature store."""

    num_layers: int
    num_heads: int
    embed_dim: int
    grid: tuple[int, int]
    support_size: int = 12  # support grid S (reference: 50x50 -> 12x12)
    channels: tuple[int, int] = (32, 128)  # correlation-transformer widths
    pooled_grid: int = 3  # block 1 pools the S x S attention queries to this (12 -> 3, i.e. pooling 4)
    attn_heads: int = 8
    attention: str = "fused"  # fused: the CPU kernel of fscs.learn.model.fused_attention | sdpa: torch's op
    groups: int = 4
    init: str = "torch"  # torch: PyTorch's default init | he: He init, prior-log-odds foreground bias
    fg_prior: float = 0.21  # foreground fraction the "he" init's last segmentation bias starts from
    prior: str = "none"  # none | prototype: the masked-prototype map of one block fed to both heads
    prior_layer: int = -1  # stored layer (position in the store's layer axis) the prototype prior matches
    kshot: str = "mean_prob"  # how K shots combine: mean_prob | mean_logit of the pairs' predictions
    # (CSTPredictor) | joint: one forward over all K supports (block 1 attends over every support's positions)
    presence_threshold: float = 0.5  # decision thresholds chosen on validation (fscs.learn.calibration); the
    fg_threshold: float = 0.5  # predictor shifts probabilities so that they fall on 0.5
    backbone: dict[str, Any] = field(default_factory=dict)  # store attributes (BACKBONE_KEYS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = [int(v) for v in self.grid]
        d["channels"] = [int(v) for v in self.channels]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CSTConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["grid"] = tuple(int(v) for v in kw["grid"])
        if "channels" in kw:
            kw["channels"] = tuple(int(v) for v in kw["channels"])
        return cls(**kw)
