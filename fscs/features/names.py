"""Backbone names (``backbone.name``) and the timm architecture behind each, without torch.

The feature store checks a store's ``arch`` against params with `resolve_arch`; keeping the names here lets
`fscs.features.store` resolve them without importing `fscs.features.backbone` (torch, and a cycle: the
backbone writes stores).
"""

from __future__ import annotations

from fscs.core.errors import FscsError
from fscs.features.imgfocus import TIMM_ARCH

DEFAULT_PATH_ARCH = "vit_small_patch8_224"

# name -> (timm architecture, pretrained tag on the hub)
HUB_BACKBONES: dict[str, tuple[str, str]] = {
    "dino_vits8": ("vit_small_patch8_224", "dino"),
    "dino_vits16": ("vit_small_patch16_224", "dino"),
    "dino_vitb8": ("vit_base_patch8_224", "dino"),
    "dinov2_vits14": ("vit_small_patch14_dinov2", "lvd142m"),
}
IMGFOCUS = "dinov2_vits14_imgfocus"
TINY = "vit_tiny_random"
KNOWN = (*HUB_BACKBONES, IMGFOCUS, TINY, "path:/file")


def known_names() -> list[str]:
    """Backbone names params.yaml may give (``path:/file`` stands for any local weights file)."""
    return list(KNOWN)


def resolve_arch(name: str, arch: str | None = None) -> str:
    """The timm architecture behind a backbone name (``arch`` only matters for ``path:`` names)."""
    if name in HUB_BACKBONES:
        return HUB_BACKBONES[name][0]
    if name == IMGFOCUS:
        return TIMM_ARCH
    if name == TINY:
        return TINY
    if name.startswith("path:"):
        return arch or DEFAULT_PATH_ARCH
    raise FscsError(f"unknown backbone {name!r}; known: {', '.join(KNOWN)}")
