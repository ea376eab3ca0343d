"""The one validated config layer: a pydantic model per params.yaml section, with its defaults in one place.

`load_config(path)` reads and validates the whole file before any stage does work: an unknown key, a value of
the wrong type or out of range ends in one `FscsError` line naming the param, the value and what is expected
(stages turn it into exit code 2). The `Config` it returns is passed down typed: each library function takes
the section it uses (``config.backbone``, ``config.pseudo``, ...). ``train`` is `TrainConfig`, a dataclass
defined here (the training loop imports it without pydantic), its types checked from its own fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dc_fields
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
from fscs.config.messages import refuse
from fscs.config.supervision import SUPERVISIONS, Supervision
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
    # stored type of tokens / q / k: fp16 (default) | bf16 | int8 (per-token scale); fscs.features.store
    storage: Literal["fp16", "bf16", "int8"] = "fp16"
    # extraction shards as a list (dvc.yaml's matrix needs one; N = its length), exactly 0..N-1; [] with
    # online features (no extraction)
    shards: list[Count] = [0]

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


class EvaluateConfig(Section):
    void: Literal["ignore", "background"] = "ignore"
    baselines: BaselinesConfig = BaselinesConfig()


class FeaturesConfig(Section):
    """Where the stages after extraction get tokens: the HDF5 store, or ``online`` from the images
    (`fscs.features.online`). ``path``, ``shards`` and ``stores`` are what dvc.yaml wires for the source
    (`fscs.config.features`: ``fscs params`` fills them in, a stage opening the features refuses others)."""

    source: Literal["store", "online"] = "store"
    path: str | None = None  # the stages' --features: the store, or the dataset root online
    shards: str | None = None  # the store's shard folder (a dep of every reader), or the dataset root
    stores: list[str] | None = None  # the stores dvc.yaml builds: [dataset name], or [] online


Budget = Literal["auto"] | Annotated[int, Field(ge=1)]


class MemoryConfig(Section):
    """What a stage may hold in memory (MiB; ``auto``: sized for the machine, `fscs.core.memory`). A budget
    decides what is kept, never a value (`tests/test_memory_budget.py`), so it is not a DVC param."""

    tokens_mb: Budget = "auto"  # host cache of stored tokens (train, validation, evaluate, baselines, report)
    prepared_mb: Budget = "auto"  # prepared CST features, on the model's device


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


# ---- the train section: plain data (a dataclass) so the training loop needs no pydantic; its field types
# are checked by a pydantic model built from its fields, its ranges by `TrainConfig.from_params`
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
    # shot counts of the training episodes, one per batch in turn ([1]: 1-way 1-shot only); more than one
    # support per episode needs model.kshot: joint, the rule that scores K supports together
    shots: list[int] = field(default_factory=lambda: [1])
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
        shots = cfg.shots
        if not (isinstance(shots, list) and shots and all(type(k) is int and k >= 1 for k in shots)):
            raise FscsError(f"params: train.shots must be a non-empty list of counts >= 1, got {shots!r}")
        if max(shots) > 1 and cfg.model.get("kshot") != "joint":
            raise FscsError(
                f"params: train.shots = {shots} trains on several supports per episode, which only "
                f"train.model.kshot: joint scores together (got kshot {cfg.model.get('kshot', 'default')!r})"
            )
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
    """params' ``train`` section -> `TrainConfig` (types checked here, ranges in `from_params`)."""

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
    features: FeaturesConfig = FeaturesConfig()
    memory: MemoryConfig = MemoryConfig()

    def need(self, name: str) -> Any:
        """The section ``name``, or FscsError when the params file lacks a required one."""
        value = getattr(self, name)
        if value is None:
            raise FscsError(f"params: missing section '{name}'")
        return value


def _known_keys() -> dict[str, list[str]]:
    """Section path -> its known keys, for the unknown-key message."""
    known: dict[str, list[str]] = {"": list(Config.model_fields)}
    for name, spec in Config.model_fields.items():
        model = typing.get_args(spec.annotation)[0] if typing.get_args(spec.annotation) else spec.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            known[name] = list(model.model_fields)
    known["evaluate.baselines"] = list(BaselinesConfig.model_fields)

    known["train"] = [f.name for f in dataclasses.fields(TrainConfig)]
    known["train.model"] = [f.name for f in dataclasses.fields(CSTConfig) if f.name not in _CST_DERIVED]
    for name in SUPERVISIONS:
        known[f"train.by_supervision.{name}"] = [k for k in known["train"] if k != "by_supervision"]
        known[f"train.by_supervision.{name}.model"] = known["train.model"]
    return known


def _refuse(exc: ValidationError, prefix: str = "") -> FscsError:
    return refuse(exc, _known_keys(), prefix)


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
