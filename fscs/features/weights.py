"""Backbone weight files: reading safetensors / torch state dicts, hashing them, fitting them to a timm model
(prefixes, heads, position-table resampling) and fetching timm hub weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from fscs.core.errors import FscsError
from fscs.core.io import load_torch
from fscs.features.names import IMGFOCUS


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """A stable hash of a state dict (names, dtypes, shapes and bytes, in sorted name order)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
