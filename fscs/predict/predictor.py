"""`Predictor`: a CST checkpoint with the backbone it names, built and checked once, then reused for
episodes (`fscs predict` builds one per run, `fscs demo` one per checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fscs.core.errors import FscsError
from fscs.core.provenance import check_provenance
from fscs.predict.memory_store import MemoryStore

if TYPE_CHECKING:
    from fscs.config.params import BackboneConfig, Config


def check_backbone(backbone: Any, config_backbone: dict[str, Any], checkpoint: str, layers: Any) -> None:
    """FscsError unless the built backbone matches what the checkpoint was trained on."""
    have = backbone.store_attrs(layers)
    from fscs.learn.model.cst import BACKBONE_KEYS

    # A backbone built here extracts the checkpoint's layers itself; the store-layout keys do not apply.
    keys = [k for k in BACKBONE_KEYS if k not in ("layers", "normalization", "code_version")]
    check_provenance(
        have,
        {key: config_backbone[key] for key in keys if key in config_backbone},
        checkpoint,
        lambda key, got, want: (
            f"built for backbone attribute {key}={want!r}, but the backbone here has {got!r}; "
            "use a checkpoint trained with this backbone (or the same weights)"
        ),
    )


def check_sizes(model_config: Any, backbone: Any, layers: Any, checkpoint: str) -> None:
    """FscsError unless the backbone's tokens have the shape the CST weights expect (a checkpoint whose
    weights come from one backbone and whose config names another is refused here, before any work)."""
    have = {
        "num_layers": len(backbone.resolve_layers(layers)),
        "num_heads": int(backbone.num_heads),
        "embed_dim": int(backbone.provenance.embed_dim),
        "grid": tuple(int(g) for g in backbone.grid),
    }
    weights = {key: getattr(model_config, key) for key in have}
    check_provenance(
        have,
        {key: tuple(int(g) for g in v) if key == "grid" else int(v) for key, v in weights.items()},
        checkpoint,
        lambda key, got, want: (
            f"its CST weights expect {key}={want!r}, but the backbone its config names "
            f"({backbone.name} at {backbone.input_size}) gives {got!r}; the checkpoint's weights and "
            "config do not belong together"
        ),
    )


def recorded_pseudo(recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The ``pseudo`` settings a checkpoint records (Labeler keyword form) as params' ``pseudo`` keys."""
    out = dict(recorded or {})
    if "threshold" in out:
        out["cst_threshold"] = out.pop("threshold")
    return out


def check_params_backbone(
    checkpoint: str, config_backbone: dict[str, Any], bb: BackboneConfig | None
) -> None:
    """FscsError when the params' backbone (name, input size) is not the one the checkpoint was built for."""
    if bb is None:
        return
    for key, ck in (("name", "backbone"), ("input_size", "input_size")):
        if ck in config_backbone and str(getattr(bb, key)) != str(config_backbone[ck]):
            raise FscsError(
                f"{checkpoint}: built for backbone {config_backbone.get('backbone')!r} at input size "
                f"{config_backbone.get('input_size')}, but the params ask for {bb.name!r} at "
                f"{bb.input_size}; use a checkpoint trained with the params' backbone"
            )


class Predictor:
    """Checkpoint + its backbone: encode images, then episodes through `fscs.learn.predictor.CSTPredictor`.

    Support masks are made at the checkpoint's ``label_size`` (its training mask size; the input size for
    older checkpoints): GT masks by nearest-exact resizing (`fscs.core.resample.nearest_torch`), pseudo-masks
    by a `fscs.pseudo.attention.Labeler` with the params' ``pseudo`` settings overridden by those the
    checkpoint records.
    """

    def __init__(self, checkpoint: str, config: Config | None = None):
        from fscs.config.checkpoint import checkpoint_label_size
        from fscs.core.device import resolve_device
        from fscs.features.backbone import create_backbone
        from fscs.learn.model.cst import load_checkpoint

        self.checkpoint = str(checkpoint)
        self.config = config
        if not Path(checkpoint).is_file():
            raise FscsError(f"{checkpoint}: checkpoint not found")
        device = resolve_device()
        self.model, self.ckpt = load_checkpoint(checkpoint)
        self.model.to(device)
        bb = dict(self.model.config.backbone)
        if "backbone" not in bb or "input_size" not in bb:
            raise FscsError(f"{checkpoint}: checkpoint config does not name its backbone (config.backbone)")
        check_params_backbone(self.checkpoint, bb, config.backbone if config is not None else None)
        self.layers = list(bb["layers"]) if isinstance(bb.get("layers"), list) else "all"
        precision = str(bb.get("precision", "fp32"))
        self.backbone = create_backbone(
            str(bb["backbone"]), int(bb["input_size"]), bb.get("arch"), device=device, precision=precision
        )
        check_backbone(self.backbone, bb, self.checkpoint, self.layers)
        check_sizes(self.model.config, self.backbone, self.layers, self.checkpoint)
        self.mask_size = checkpoint_label_size(self.ckpt, checkpoint)
        params_pseudo = config.pseudo.model_dump() if config is not None else {}
        self.pseudo = {**params_pseudo, **recorded_pseudo(self.ckpt.get("config", {}).get("pseudo"))}

    def encode(self, images: list[np.ndarray], batch_size: int = 8) -> list[dict[str, np.ndarray]]:
        """Tokens, CLS query and patch keys per image, rounded to float16 as in the feature store."""
        import torch

        out = []
        for i in range(0, len(images), batch_size):
            x = self.backbone.preprocess_batch(images[i : i + batch_size])
            f = self.backbone.extract(x, self.layers).cpu()
            for b in range(x.shape[0]):
                out.append(
                    {
                        "tokens": f.tokens[b].to(torch.float16).numpy(),
                        "cls_query": f.cls_query[b].to(torch.float16).numpy(),
                        "patch_keys": f.patch_keys[b].to(torch.float16).numpy(),
                    }
                )
        return out

    def support_masks(
        self, encs: list[dict[str, np.ndarray]], fgs: list[np.ndarray | None], stuff: list[bool]
    ) -> list[np.ndarray]:
        """Bool (label_size, label_size) masks: the given full-size foreground, else the self pseudo-mask
        (its complement where ``stuff``: attention covers the salient object, not the grass around it)."""
        from fscs.config.params import validate_section
        from fscs.core.resample import nearest_torch
        from fscs.pseudo.attention import Labeler

        labeler = Labeler.from_config(
            MemoryStore(encs, self.backbone), validate_section("pseudo", self.pseudo)
        )
        masks = []
        for i, (fg, is_stuff) in enumerate(zip(fgs, stuff, strict=True)):
            if fg is not None:
                masks.append(nearest_torch(np.asarray(fg, dtype=np.uint8), self.mask_size) > 0)
                continue
            pseudo = np.asarray(labeler.support_mask(str(i), self.mask_size), dtype=bool)
            masks.append(~pseudo if is_stuff else pseudo)
        return masks

    def episode_predictor(self, encs: list[dict[str, np.ndarray]], masks: dict[str, np.ndarray]) -> Any:
        """A CSTPredictor over the encoded images (ids "0", "1", ...) with the given support masks."""
        from fscs.learn.predictor import CSTPredictor, TokenBank

        bank = TokenBank(MemoryStore(encs, self.backbone))
        return CSTPredictor(self.model, bank, lambda image_id, class_id: masks[image_id])
