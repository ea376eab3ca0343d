"""One cell of the study (supervision x fold) ready to train: its index, classes, validation episodes, targets
and the tokens of every image its episodes can touch, loaded from the pipeline's files once.

The train stage and `experiments.learner_sweep` share it, so a sweep measures exactly what the stage trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fscs.core.errors import FscsError
from fscs.data.episodes import read_episodes
from fscs.data.folds import class_names, read_folds, training_classes
from fscs.data.index import read_index
from fscs.features.store import FeatureStore, expected_attrs
from fscs.learn.model.cst import CSTConfig, config_from_store
from fscs.learn.predictor import TokenBank
from fscs.learn.targets import Targets, targets_for
from fscs.learn.train import TrainConfig, TrainResult, train, training_images


@dataclass
class Cell:
    supervision: str
    fold: int
    index: pd.DataFrame
    split: str
    train_classes: list[int]
    val: pd.DataFrame  # the fold's 1-way 1-shot validation episodes
    store: FeatureStore
    targets: Targets
    tokens: TokenBank
    void: str
    val_classes: list[int] | None = None  # classes of `val` if not `train_classes` (held-out validation)

    def model_config(self, cfg: TrainConfig) -> CSTConfig:
        return config_from_store(self.store, **cfg.model)


def default_paths(params: dict[str, Any]) -> dict[str, str]:
    """The pipeline's file names for the dataset in params (as dvc.yaml writes them)."""
    name = params["dataset"]["name"]
    return {
        "index": f"data/index/{name}.parquet",
        "folds": f"data/episodes/{name}/folds.json",
        "episodes": f"data/episodes/{name}",
        "features": f"data/features/{name}.h5",
        "pseudo": f"data/pseudo/{name}.h5",
        "enhanced": f"data/pseudo/{name}-enhanced.h5",
        "enhancer": "models/enhancer.pt",
    }


def load_cell(
    params: dict[str, Any], supervision: str, fold: int, paths: dict[str, str | None] | None = None
) -> Cell:
    """Open the feature store and load everything one cell's training reads (errors name the file)."""
    p = {**default_paths(params), **(paths or {})}
    if supervision == "pixel":
        p["pseudo"] = p["enhanced"] = p["enhancer"] = None
    elif supervision == "image":
        p["enhanced"] = p["enhancer"] = None
    cfg = TrainConfig.from_params(params.get("train", {})).for_supervision(supervision)
    index = read_index(p["index"])
    folds = read_folds(p["folds"])
    train_classes = training_classes(folds, fold)
    split = str(folds["train_split"])
    val_path = Path(p["episodes"]) / "val.parquet"
    val = read_episodes(val_path)
    val = val[(val["fold"] == fold) & (val["way"] == 1) & (val["shot"] == 1)].reset_index(drop=True)
    if val.empty:
        raise FscsError(f"{val_path}: no 1-way 1-shot validation episodes for fold {fold}")
    store = FeatureStore(p["features"], expect=expected_attrs(params))
    try:
        targets = targets_for(
            supervision,
            params,
            store,
            index,
            cfg.label_size,
            fold=fold,
            pseudo=p["pseudo"],
            enhancer=p["enhancer"],
            enhanced=p["enhanced"],
            class_names=class_names(folds),
        )
        ids = training_images(index, split, train_classes)
        if not ids:
            raise FscsError(f"{p['index']}: no '{split}' images with fold {fold}'s training classes")
        ids += [str(i) for i in val["query_id"]] + [
            str(s) for ss in val["support_ids"] for sh in ss for s in sh
        ]
        missing = sorted({i for i in ids if i not in store})
        if missing:
            raise FscsError(
                f"{p['features']}: {len(missing)} training images are not in the store "
                f"(first: {missing[0]!r}); re-run `dvc repro extract`"
            )
        void = str((params.get("evaluate") or {}).get("void", "ignore"))
        tokens = TokenBank(store, ids, progress=None)
    except BaseException:
        store.close()  # the cell owns the open store only once it is returned
        raise
    return Cell(supervision, fold, index, split, train_classes, val, store, targets, tokens, void)


def train_cell(
    cell: Cell, cfg: TrainConfig, on_epoch: Any = None, progress: bool | None = None, device: Any = None
) -> TrainResult:
    """Train one CST model for the cell (selection on its validation episodes) on ``device`` (a
    torch.device; default `fscs.core.device.resolve_device`)."""
    return train(
        config=cfg,
        tokens=cell.tokens,
        model_config=cell.model_config(cfg),
        targets=cell.targets,
        index=cell.index,
        train_split=cell.split,
        train_classes=cell.train_classes,
        fold=cell.fold,
        val_episodes=cell.val,
        void=cell.void,
        val_classes=cell.val_classes,
        on_epoch=on_epoch,
        progress=progress,
        device=device,
    )
