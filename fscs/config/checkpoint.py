"""What a CST checkpoint's ``config`` must hold, checked with the params layer's types and messages."""

from __future__ import annotations

import functools
import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from fscs.config.cst import ATTENTIONS, KSHOT_RULES, PRIORS
from fscs.config.messages import refuse
from fscs.config.params import PositiveInt
from fscs.core.errors import FscsError


@functools.cache
def _checkpoint_config_model() -> type[BaseModel]:
    """`CSTConfig`'s fields and ``label_size`` with their types and ranges, as a checkpoint records them
    (lists for tuples); other keys of a checkpoint's config (pseudo, ...) are checked where they are used."""
    unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    pair = Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]
    fields = {
        "num_layers": (PositiveInt, ...),
        "num_heads": (PositiveInt, ...),
        "embed_dim": (PositiveInt, ...),
        "grid": (pair, ...),
        "channels": (pair, None),
        "attention": (Literal[ATTENTIONS], None),
        "kshot": (Literal[KSHOT_RULES], None),
        "prior": (Literal[PRIORS], None),
        "init": (Literal["torch", "he"], None),
        "prior_layer": (int, None),
        "fg_prior": (Annotated[float, Field(gt=0, lt=1)], None),
        "presence_threshold": (unit, None),
        "fg_threshold": (unit, None),
        "backbone": (dict[str, Any], None),
        **{name: (PositiveInt, None) for name in ("support_size", "pooled_grid", "attn_heads", "groups")},
        "label_size": (PositiveInt, None),
    }
    return create_model("CheckpointConfig", __config__=ConfigDict(extra="allow", strict=True), **fields)


def validate_checkpoint_config(config: Any, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose ``config`` is not the mapping fscs writes, naming the field at fault."""
    if not isinstance(config, dict):
        raise FscsError(f"{path}: checkpoint config is {type(config).__name__}, not a mapping")
    try:
        _checkpoint_config_model().model_validate(config)
    except ValidationError as exc:
        raise refuse(exc, {}, "config.", source=str(path)) from None


def checkpoint_label_size(ckpt: dict[str, Any], path: str | os.PathLike) -> int:
    """The mask size a CST checkpoint was trained at (every checkpoint records it)."""
    size = (ckpt.get("config") or {}).get("label_size")
    if not isinstance(size, int) or size < 1:
        raise FscsError(f"{path}: checkpoint does not record its label_size (config.label_size)")
    return size
