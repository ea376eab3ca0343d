"""CST: the Classification-Segmentation Transformer over a frozen ViT's tokens (METHOD.md §5).

forward(query_tokens (B, L, 1+Pq, D), support_tokens (B, L, 1+Ps, D), support_mask (B, h, w))
    -> cls_logits (B, 2) (absent, present), seg_logits (B, 2, 2gh, 2gw) (background, foreground).

Checkpoints: ``torch.save({"state_dict", "config", "fold", "supervision", "epoch", "val_miou", ...})`` with
only plain Python values and tensors, so `load_checkpoint` reads them with ``weights_only=True``. The config
records the feature store's backbone attributes; `check_store` refuses a store that disagrees.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fscs.config.cst import ATTENTIONS, KSHOT_RULES, PRIORS, CSTConfig
from fscs.core.errors import FscsError
from fscs.core.provenance import check_provenance, plain
from fscs.learn.model.correlation import correlate, prepare_query, prepare_support, resize_mask
from fscs.learn.model.heads import ClassificationHead, SegmentationHead
from fscs.learn.model.prior import CHANNELS as PRIOR_CHANNELS
from fscs.learn.model.prior import prepare_prior, prototype_prior
from fscs.learn.model.transformer import CorrelationBlock, GroupNormLast, pool_support

#: Store attributes a checkpoint records and a store must match at load/eval time.
BACKBONE_KEYS = (
    "backbone",
    "arch",
    "weights_sha256",
    "input_size",
    "patch_size",
    "grid",
    "layers",
    "num_heads",
    "embed_dim",
    "normalization",
    "code_version",
    "precision",
)


def backbone_attrs(store_attrs: dict[str, Any]) -> dict[str, Any]:
    """The store attributes a checkpoint records, as plain Python values."""

    return {k: plain(store_attrs[k]) for k in BACKBONE_KEYS if k in store_attrs}


def config_from_store(store: Any, **sizes: Any) -> CSTConfig:
    """A CSTConfig sized for a FeatureStore (num layers / heads / dim / grid from its attributes)."""
    attrs = store.attrs
    return CSTConfig(
        num_layers=len(attrs["layers"]),
        num_heads=int(attrs["num_heads"]),
        embed_dim=int(attrs["embed_dim"]),
        grid=tuple(int(v) for v in attrs["grid"]),
        backbone=backbone_attrs(attrs),
        **sizes,
    )


def pooling_weights(ns: int, out_size: int) -> torch.Tensor:
    """(1+S'*S', 1+S*S) weights W with ``W @ v`` = `pool_support` along v's position axis: CLS kept, the
    grid average-pooled to S' x S'."""
    eye = torch.eye(ns).view(1, 1, ns, ns)  # pool_support's layout: positions on dim 2, "channels" last
    return pool_support(eye, out_size)[0, 0]


class CST(nn.Module):
    def __init__(self, config: CSTConfig):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        cin = config.num_layers * config.num_heads
        if config.attention not in ATTENTIONS:
            raise ValueError(f"CST attention must be one of {ATTENTIONS}, got {config.attention!r}")
        blocks = {"heads": config.attn_heads, "groups": config.groups, "attention": config.attention}
        self.block1 = CorrelationBlock(cin, c1, config.pooled_grid, **blocks)
        self.block2 = CorrelationBlock(c1, c2, 1, **blocks)
        self.post = nn.Sequential(  # 2 x (1x1 conv, GN, ReLU), channel-last
            nn.Linear(c2, c2),
            GroupNormLast(config.groups, c2),
            nn.ReLU(),
            nn.Linear(c2, c2),
            GroupNormLast(config.groups, c2),
            nn.ReLU(),
        )
        if config.prior not in PRIORS:
            raise ValueError(f"CST prior must be one of {PRIORS}, got {config.prior!r}")
        if self.uses_prior and not -config.num_layers <= config.prior_layer < config.num_layers:
            raise FscsError(
                f"params: train.model.prior_layer = {config.prior_layer} is not one of the feature store's "
                f"{config.num_layers} layers (use -{config.num_layers} .. {config.num_layers - 1})"
            )
        extra = PRIOR_CHANNELS if self.uses_prior else 0
        self.cls_head = ClassificationHead(c2, c2 // 2, extra)
        self.seg_head = SegmentationHead(c2, c2 // 2, extra)
        if config.kshot not in KSHOT_RULES:
            raise ValueError(f"CST kshot must be one of {KSHOT_RULES}, got {config.kshot!r}")
        # block 1's query positions from the support's (fixed length: prepare_support resizes to S x S)
        ns = 1 + config.support_size**2
        self.register_buffer("pooling", pooling_weights(ns, config.pooled_grid), persistent=False)
        if config.init == "he":
            he_init(self, config.fg_prior)
        elif config.init != "torch":
            raise ValueError(f"CST init must be 'torch' or 'he', got {config.init!r}")

    @property
    def uses_prior(self) -> bool:
        """Whether the heads take the prototype prior map (then `forward_prepared` needs ``prior``)."""
        return self.config.prior != "none"

    # The pieces are exposed so training can prepare (normalize, downsample) each image's tokens once.
    def prepare_query(self, query_tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, 1+Pq, D) tokens -> (B, L*H, Pq, d) unit per-head patch vectors."""
        self._check_tokens(query_tokens, "query")
        return prepare_query(query_tokens, self.config.num_heads)

    def prepare_support(self, support_tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, 1+Ps, D) tokens -> (B, L*H, 1+S*S, d) unit per-head vectors, CLS first."""
        self._check_tokens(support_tokens, "support")
        return prepare_support(
            support_tokens, self.config.grid, self.config.num_heads, self.config.support_size
        )

    def prepare_prior(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, 1+P, D) tokens -> (B, P, D) unit patch vectors of the prior's layer (query or support)."""
        self._check_tokens(tokens, "prior")
        return prepare_prior(tokens, self.config.prior_layer)

    def forward_prepared(
        self,
        query: torch.Tensor,
        support: torch.Tensor,
        support_mask: torch.Tensor,
        prior: tuple[torch.Tensor, torch.Tensor] | None = None,
        shots: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared query/support (prepare_*), support mask (B, h, w) -> (cls (B,2), seg (B,2,2gh,2gw)).

        ``query`` may have batch 1 for B supports (one query scored against several support images).
        ``prior``: (query, support) from `prepare_prior`, needed when the model uses the prior map.
        ``shots`` > 1 (the ``joint`` K-shot rule): the supports are B/shots groups of that many consecutive
        supports, one group per query (``query`` batch B/shots, or 1), and each group gives one prediction
        (B/shots rows) from one attention over all its supports' positions (`join_shots`)."""
        gh, gw = self.config.grid
        if self.uses_prior and prior is None:
            raise ValueError(f"this CST uses the {self.config.prior!r} prior: pass prior=(query, support)")
        if shots > 1 and query.shape[0] > 1:
            query = query.repeat_interleave(shots, dim=0)  # each group's query beside each of its supports
        x = correlate(query, support).permute(0, 2, 3, 1)  # B, Pq, 1+S*S, L*H (channel-last view)
        # Block 1's attention queries are the support-pooled correlations. Pooling and correlation are both
        # linear, so the support vectors are pooled first (one small product with the pooling matrix): the
        # same numbers up to rounding, without pooling (or copying) the large correlation tensor.
        pooled = torch.matmul(self.pooling, support)
        x_pooled = correlate(query, pooled).permute(0, 2, 3, 1)
        mask = resize_mask(support_mask.to(x.device), self.config.support_size)
        x, mask = self.block1(x, mask, x_pooled, shots)
        x, _ = self.block2(x, mask)  # B, Pq, 2, C
        x = self.post(x)
        b, c = x.shape[0], x.shape[-1]
        maps = x.permute(0, 2, 3, 1).reshape(b, 2, c, gh, gw)
        cls_in, seg_in = maps[:, 0], maps[:, 1]
        if self.uses_prior:
            p = prototype_prior(prior[0], prior[1], support_mask.to(x.device), (gh, gw), shots)
            cls_in, seg_in = torch.cat([cls_in, p], dim=1), torch.cat([seg_in, p], dim=1)
        return self.cls_head(cls_in), self.seg_head(seg_in)

    def forward(
        self, query_tokens: torch.Tensor, support_tokens: torch.Tensor, support_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prior = None
        if self.uses_prior:
            prior = (self.prepare_prior(query_tokens), self.prepare_prior(support_tokens))
        return self.forward_prepared(
            self.prepare_query(query_tokens), self.prepare_support(support_tokens), support_mask, prior
        )

    def _check_tokens(self, tokens: torch.Tensor, what: str) -> None:
        cfg = self.config
        gh, gw = cfg.grid
        want = (cfg.num_layers, 1 + gh * gw, cfg.embed_dim)
        if tokens.dim() != 4 or tuple(tokens.shape[1:]) != want:
            raise ValueError(
                f"{what} tokens have shape {tuple(tokens.shape)}, expected (B, {', '.join(map(str, want))})"
            )


def he_init(model: CST, fg_prior: float) -> None:
    """He (fan-in, ReLU) init of every linear / conv layer, zero biases; the two output layers start near 0
    with the class prior as bias, so the first steps see calibrated, not saturated or vanishing, logits.

    With PyTorch's default init the segmentation head's four plain convolutions shrink the signal ~30x
    and the logits vary by ~0.02 over pixels, which gives the flat-then-sudden learning curves."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    prior = min(max(float(fg_prior), 1e-3), 1 - 1e-3)
    for last, bias in (
        (model.seg_head.post[-1], math.log(prior / (1 - prior))),
        (model.cls_head.body[-1], 0.0),
    ):
        nn.init.normal_(last.weight, std=1e-3)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([0.0, bias]))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- checkpoints ------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike, model: CST, config_extra: dict[str, Any] | None = None, **extra: Any
) -> None:
    """Write {"state_dict", "config", **extra} atomically (extra: fold, supervision, epoch, val_miou, ...).

    ``config_extra`` (e.g. label_size, supervision) is merged into the config dict; plain values only."""
    from fscs.core.io import save_torch

    payload: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    }
    payload["config"] = {**model.config.to_dict(), **(config_extra or {})}
    payload.update(extra)
    save_torch(payload, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, loaded with weights_only=True; FscsError naming the file if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise FscsError(f"{p}: checkpoint not found; run the train stage first")
    from fscs.config.checkpoint import validate_checkpoint_config  # pydantic: only where a checkpoint is read
    from fscs.core.io import load_torch

    ckpt = load_torch(p, "CST checkpoint")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise FscsError(f"{p}: not a CST checkpoint (expected keys 'state_dict' and 'config')")
    if not isinstance(ckpt["state_dict"], dict):
        raise FscsError(f"{p}: checkpoint state_dict is {type(ckpt['state_dict']).__name__}, not a mapping")
    validate_checkpoint_config(ckpt["config"], p)
    return ckpt


def load_checkpoint(path: str | os.PathLike, store: Any = None) -> tuple[CST, dict[str, Any]]:
    """(model in eval mode, checkpoint dict). With a store, refuse it unless its backbone attrs match."""
    ckpt = read_checkpoint(path)
    try:
        config = CSTConfig.from_dict(ckpt["config"])
        model = CST(config)
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise FscsError(f"{path}: checkpoint does not match the CST model ({exc})") from exc
    model.eval()
    if store is not None:
        check_store(config, store, str(path))
    return model, ckpt


def check_store(config: CSTConfig, store: Any, checkpoint: str = "checkpoint") -> None:
    """FscsError naming the first backbone attribute where the store differs from the training features."""
    where = getattr(store, "path", "feature store")
    check_provenance(
        backbone_attrs(store.attrs),
        config.backbone,
        str(where),
        lambda key, have, want: (
            f"attribute '{key}' is {have!r} but {checkpoint} was trained on features with {want!r}; "
            "use a feature store extracted with the same backbone"
        ),
    )
    gh, gw = config.grid
    if tuple(int(v) for v in store.attrs["grid"]) != (gh, gw):
        raise FscsError(f"{where}: token grid differs from {checkpoint}'s {gh}x{gw}")
