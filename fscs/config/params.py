"""The one validated config layer: a pydantic model per params.yaml section, with its defaults in one place.

`load_config(path)` reads and validates the whole file before any stage does work: an unknown key, a value of
the wrong type or out of range ends in one `FscsError` line naming the param, the value and what is expected
(stages turn it into exit code 2). `Config.params()` gives the validated file as the plain nested dict the
library functions take, with every default filled in. The ``train`` section is validated by
`fscs.config.train.TrainConfig` (its home); here only its value types are checked, from its own fields.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)

from fscs.config.cst import CSTConfig
from fscs.config.supervision import SUPERVISIONS, Supervision
from fscs.config.train import TrainConfig
from fscs.core.errors import FscsError


def _as_list(value: Any) -> Any:
    """A scalar where a list is expected is a one-element list; null is the empty list."""
    if value is None:
        return []
    return value if isinstance(value, list | tuple) else [value]


PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Names = Annotated[list[str], BeforeValidator(_as_list)]


class Section(BaseModel):
    """Common settings: unknown keys refused, no type coercion (a string is never a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DatasetConfig(Section):
    name: str = "dataset"
    root: str = Field(min_length=1)
    layout: Literal["voc", "coco_json", "coco_png"] = "voc"
    train_split: str = Field(min_length=1)
    test_split: str = Field(min_length=1)
    exclude_classes: Names = []
    min_class_pixels: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    mask_dir: str | None = None  # voc: SegmentationClass; coco_png: annotations (relative to root)
    split_dir: str | None = None  # voc: ImageSets/Segmentation
    mask_cache: str | None = None  # coco_json: data/raw/masks_rendered/<name>


class FoldsConfig(Section):
    n: PositiveInt = 4
    order: Literal["contiguous", "interleaved"] = "contiguous"


class EpisodesConfig(Section):
    seed: Count = 0
    test_per_fold: Count = 1000
    val_per_fold: Count = 100
    too_few_images: Literal["error", "drop"] = "error"
    ways: Annotated[list[PositiveInt], BeforeValidator(_as_list), Field(min_length=1)] = [1]
    shots: Annotated[list[PositiveInt], BeforeValidator(_as_list), Field(min_length=1)] = [1]


class BackboneConfig(Section):
    name: str = Field(min_length=1)
    input_size: PositiveInt = 224
    layers: Literal["all"] | int | Annotated[list[int], Field(min_length=1)] = "all"
    batch_size: PositiveInt = 8
    fused: bool = True
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast around the ViT forward (fscs.core.device)
    threads: Count = 0  # 0: all available cores
    arch: str | None = None  # timm architecture of a path: checkpoint
    # extraction shards as a list (dvc.yaml's matrix needs one; N = its length), exactly 0..N-1
    shards: Annotated[list[Count], Field(min_length=1)] = [0]

    @field_validator("shards")
    @classmethod
    def _shards_are_a_range(cls, shards: list[int]) -> list[int]:
        if shards != list(range(len(shards))):
            raise ValueError(f"the shard ids 0..{len(shards) - 1} in order, one per shard")
        return shards

    @field_validator("precision")
    @classmethod
    def _bf16_not_fused(cls, precision: str, info: ValidationInfo) -> str:
        if precision == "bf16" and info.data.get("fused"):
            raise ValueError(
                "bf16 runs timm's blocks under autocast (the fused path is float32 only): set fused: false"
            )
        return precision


class PseudoConfig(Section):
    recipe: Literal["cst", "dino"] = "cst"
    center_keys: bool = True
    cst_threshold: Fraction = 0.5
    dino_mass: Fraction = 0.6
    dino_heads: Literal["mean", "vote", "union"] = "mean"
    dino_mass_sweep: Annotated[list[Fraction], BeforeValidator(_as_list)] = [0.4, 0.5, 0.6, 0.7, 0.8]
    sweep: Annotated[list[Fraction], BeforeValidator(_as_list)] = []  # cst_threshold is always measured too
    pairs_per_label: Count = 2
    seed: Count = 0
    stuff_classes: Names = []
    stuff_masks: Literal["same", "complement"] = "same"  # fscs.learn.targets: complement the masks of stuff


class MixedConfig(Section):
    fraction: Fraction = 0.1
    seed: Count = 0
    sweep: Annotated[list[Fraction], BeforeValidator(_as_list)] = []  # `fraction` is always measured too


class EnhancerConfig(Section):
    in_channels: PositiveInt = 6
    width: PositiveInt = 128
    threshold: Literal["auto"] | Annotated[float, Field(gt=0, lt=1)] = "auto"
    threshold_grid: Annotated[list[Fraction], Field(min_length=1)] = [
        0.2,
        0.25,
        0.3,
        0.35,
        0.4,
        0.45,
        0.5,
        0.55,
        0.6,
        0.65,
        0.7,
    ]
    scale: PositiveInt = 1
    loss: Literal["bce", "bce_dice"] = "bce"
    steps: PositiveInt = 600
    batch_size: PositiveInt = 16
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    label_size: PositiveInt = 64
    flip: bool = True
    seed: Count = 0
    inputs: Literal["self", "pair", "both"] = "both"
    pairs_per_label: PositiveInt = 2
    per_fold: bool = True
    train_classes: Literal["all", "objects"] = "all"
    threads: PositiveInt = 1
    figures: PositiveInt = 6


class BaselinesConfig(Section):
    names: Annotated[list[Literal["attention", "prototype", "prototype_gt"]], Field(min_length=1)] = [
        "attention",
        "prototype",
        "prototype_gt",
    ]
    layer: int = -1
    presence_stats: Annotated[list[Literal["max", "mean", "top10"]], Field(min_length=1)] = [
        "max",
        "mean",
        "top10",
    ]
    gate: bool = True
    cache_images: PositiveInt = 2048


class EvaluateConfig(Section):
    void: Literal["ignore", "background"] = "ignore"
    baselines: BaselinesConfig = BaselinesConfig()


class StudyConfig(Section):
    supervisions: Annotated[list[Supervision], Field(min_length=1)] = list(SUPERVISIONS)
    folds: Annotated[list[Count], Field(min_length=1)] = [0, 1, 2, 3]
    compare: Supervision = "pixel"  # the setting whose numbers go into reports/summary.json

    @field_validator("compare")
    @classmethod
    def _compare_is_studied(cls, compare: str, info: ValidationInfo) -> str:
        studied = info.data.get("supervisions", [])
        if compare not in studied:
            raise ValueError(f"one of study.supervisions {studied}")
        return compare


# ---- the train section: TrainConfig (fscs.learn.train) is its home; here only its field types are checked
# ----
_CST_DERIVED = {"num_layers", "num_heads", "embed_dim", "grid", "backbone"}  # come from the feature store


def _dataclass_model(cls: type, name: str, skip: set[str] = frozenset(), **overrides: Any) -> type[BaseModel]:
    """A strict, extra-forbidding pydantic model with a dataclass's field types; every field optional, so
    the dataclass keeps its defaults. ``overrides``: field name -> annotation replacing the dataclass's."""
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: (overrides.get(f.name, hints[f.name]) | None, None)
        for f in dataclasses.fields(cls)
        if f.name not in skip
    }
    return create_model(name, __config__=Section.model_config, **fields)


@functools.cache
def _train_type_model() -> type[BaseModel]:

    sizes = {
        f.name: PositiveInt
        for f in dataclasses.fields(CSTConfig)
        if typing.get_type_hints(CSTConfig)[f.name] is int
    }
    sizes["channels"] = Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]
    model = _dataclass_model(CSTConfig, "TrainModel", skip=_CST_DERIVED, **sizes)
    override = _dataclass_model(TrainConfig, "TrainOverride", skip={"by_supervision"}, model=model)
    return _dataclass_model(
        TrainConfig, "TrainSection", model=model, by_supervision=dict[Supervision, override]
    )


def _train_config(value: Any) -> Any:
    """params' ``train`` section -> fscs.learn.train.TrainConfig (types checked here, ranges there)."""

    if isinstance(value, TrainConfig):
        return value
    section = {} if value is None else value
    if not isinstance(section, dict):
        raise ValueError(f"expected a mapping, got {section!r}")
    _train_type_model().model_validate(section)
    return TrainConfig.from_params(section)


class Config(BaseModel):
    """The whole params file, every section validated; ``dataset`` and ``backbone`` have required keys."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    dataset: DatasetConfig | None = None
    folds: FoldsConfig = FoldsConfig()
    episodes: EpisodesConfig = EpisodesConfig()
    backbone: BackboneConfig | None = None
    pseudo: PseudoConfig = PseudoConfig()
    mixed: MixedConfig = MixedConfig()
    enhancer: EnhancerConfig = EnhancerConfig()
    train: Annotated[Any, BeforeValidator(_train_config)] = Field(default_factory=lambda: _train_config({}))
    evaluate: EvaluateConfig = EvaluateConfig()
    study: StudyConfig = StudyConfig()

    def need(self, name: str) -> Any:
        """The section ``name``, or FscsError when the params file lacks a required one."""
        value = getattr(self, name)
        if value is None:
            raise FscsError(f"params: missing section '{name}'")
        return value

    def params(self) -> dict[str, Any]:
        """The validated params as a plain nested dict, defaults filled in (absent optional keys left out)."""
        out = self.model_dump(exclude_none=True, exclude={"train"})
        out["train"] = dataclasses.asdict(self.train)
        return out


_PLAIN = {
    "greater than or equal to ": ">= ",
    "less than or equal to ": "<= ",
    "greater than ": "> ",
    "less than ": "< ",
    "a valid integer": "an integer",
    "a valid number": "a number",
    "a valid boolean": "true or false",
    "a valid ": "a ",
}
_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none"}


def _param(error: dict[str, Any]) -> str:
    """The dotted param name of a pydantic error (union member tags such as "int" dropped)."""
    tags = ("[", "constrained-")
    return ".".join(
        str(p)
        for p in error["loc"]
        if isinstance(p, int) or not (p in _TYPE_TAGS or any(t in p for t in tags))
    )


def _describe(param: str, errors: list[dict[str, Any]], known: dict[str, list[str]], source: str) -> str:
    """The errors of one param as '<source>: <param> = <value>: expected ...'."""
    first = errors[0]
    if first["type"] == "extra_forbidden":
        parent = param.rpartition(".")[0]
        return f"{source}: unknown key '{param}' (known: {', '.join(known.get(parent, []))})"
    if first["type"] == "missing":
        return f"{source}: missing key '{param}'"
    msgs = []
    for e in errors:
        m = e["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
        for long, short in _PLAIN.items():
            m = m.replace(long, short)
        if m not in msgs:
            msgs.append(m)
    return f"{source}: {param} = {first['input']!r}: expected {' or '.join(msgs)}"


def _known_keys() -> dict[str, list[str]]:
    """Section path -> its known keys, for the unknown-key message."""
    known: dict[str, list[str]] = {"": list(Config.model_fields)}
    for name, field in Config.model_fields.items():
        model = (
            typing.get_args(field.annotation)[0] if typing.get_args(field.annotation) else field.annotation
        )
        if isinstance(model, type) and issubclass(model, BaseModel):
            known[name] = list(model.model_fields)
    known["evaluate.baselines"] = list(BaselinesConfig.model_fields)

    known["train"] = [f.name for f in dataclasses.fields(TrainConfig)]
    known["train.model"] = [f.name for f in dataclasses.fields(CSTConfig) if f.name not in _CST_DERIVED]
    for name in SUPERVISIONS:
        known[f"train.by_supervision.{name}"] = [k for k in known["train"] if k != "by_supervision"]
        known[f"train.by_supervision.{name}.model"] = known["train.model"]
    return known


def _refuse(exc: ValidationError, prefix: str = "", source: str = "params") -> FscsError:
    """A pydantic ValidationError as one FscsError line, one clause per param at fault."""
    known = _known_keys()
    by_param: dict[str, list[dict[str, Any]]] = {}
    for error in exc.errors():
        by_param.setdefault(prefix + _param(error), []).append(error)
    return FscsError("; ".join(_describe(p, es, known, source) for p, es in by_param.items()))


def validate(params: dict[str, Any]) -> Config:
    """Validate a params dict (the parsed file); FscsError naming each param at fault."""
    try:
        return Config.model_validate(params)
    except ValidationError as exc:
        raise _refuse(exc) from None


def validate_section(name: str, value: dict[str, Any] | None) -> Section:
    """Validate one section (not ``train``) on its own, e.g. a section a checkpoint records."""
    model = Config.model_fields[name].annotation
    model = next((a for a in typing.get_args(model) if a is not type(None)), model)
    try:
        return model.model_validate(value or {})
    except ValidationError as exc:
        raise _refuse(exc, f"{name}.") from None


def backbone_section(params: dict[str, Any]) -> BackboneConfig:
    """The validated ``backbone`` section of a params dict (the whole file or the section itself)."""
    bb = params.get("backbone", params)
    if not isinstance(bb, dict) or "name" not in bb:
        raise FscsError("params: missing section 'backbone' (with at least 'name')")
    return validate_section("backbone", bb)


def read_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    """The params file as parsed YAML (not validated), naming the file when it is missing or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise FscsError(f"{p}: params file not found")
    try:
        params = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise FscsError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(params, dict):
        raise FscsError(f"{p}: expected a mapping at the top level")
    return params


def load_config(path: str | os.PathLike = "params.yaml") -> Config:
    """Read and validate the params file."""
    return validate(read_params(path))


@functools.cache
def _checkpoint_config_model() -> type[BaseModel]:
    """`CSTConfig`'s fields and ``label_size`` with their types and ranges, as a checkpoint records them
    (lists for tuples); other keys of a checkpoint's config (pseudo, ...) are checked where they are used."""
    from fscs.config.cst import ATTENTIONS, KSHOT_RULES, PRIORS

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
        raise _refuse(exc, "config.", source=str(path)) from None


def checkpoint_label_size(ckpt: dict[str, Any], path: str | os.PathLike) -> int:
    """The mask size a CST checkpoint was trained at (every checkpoint records it)."""
    size = (ckpt.get("config") or {}).get("label_size")
    if not isinstance(size, int) or size < 1:
        raise FscsError(f"{path}: checkpoint does not record its label_size (config.label_size)")
    return size
