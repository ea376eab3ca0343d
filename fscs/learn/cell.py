"""One cell of the study (supervision x fold) ready to train: its index, classes, validation episodes, targets
and a token bank over the store (read on demand under ``memory.tokens_mb``), loaded from the pipeline's files.

The train stage and `experiments.learner_sweep` share it (`fscs.learn.train.train_cell` trains it), so a
sweep measures exactly what the stage trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fscs.config.params import Config, MemoryConfig, TrainConfig
from fscs.core.errors import FscsError
from fscs.core.memory import budget_bytes
from fscs.data.episodes import read_episodes
from fscs.data.folds import class_names, read_folds, training_classes
from fscs.data.index import read_index
from fscs.features.online import OnlineStore, open_features
from fscs.features.store import FeatureStore
from fscs.learn.model.cst import CSTConfig, config_from_store
from fscs.learn.predictor import TokenBank
from fscs.learn.targets import Targets, targets_for


@dataclass
class Cell:
    supervision: str
    fold: int
    index: pd.DataFrame
    split: str
    train_classes: list[int]
    val: pd.DataFrame  # the fold's 1-way 1-shot validation episodes
    store: FeatureStore | OnlineStore
    targets: Targets
    tokens: TokenBank
    void: str
    memory: MemoryConfig = MemoryConfig()  # the budgets training runs under
    val_classes: list[int] | None = None  # classes of `val` if not `train_classes` (held-out validation)
    val_kshot: pd.DataFrame | None = None  # its 1-way K-shot (K > 1) ones (train.calibrate_shots)

    def model_config(self, cfg: TrainConfig) -> CSTConfig:
        return config_from_store(self.store, **cfg.model)


def training_images(index: pd.DataFrame, split: str, classes: list[int]) -> list[str]:
    """Images of ``split`` having at least one of ``classes`` (every image a training episode can touch)."""
    wanted = set(int(c) for c in classes)
    rows = index[
        (index["split"] == split) & index["classes"].map(lambda cs: bool(wanted & set(map(int, cs))))
    ]
    return [str(i) for i in rows.index]


def load_cell(config: Config, supervision: str, fold: int, paths: dict[str, str | None]) -> Cell:
    """Open the feature store and load everything one cell's training reads (errors name the file).
    ``paths``: index, folds, episodes, features, pseudo, enhanced, enhancer (`fscs.config.paths`)."""
    p = dict(paths)
    if supervision == "pixel":
        p["pseudo"] = p["enhanced"] = p["enhancer"] = None
    elif supervision == "image":
        p["enhanced"] = p["enhancer"] = None
    label_size = config.train.for_supervision(supervision).label_size
    index = read_index(p["index"])
    folds = read_folds(p["folds"])
    train_classes = training_classes(folds, fold)
    split = str(folds["train_split"])
    val_path = Path(p["episodes"]) / "val.parquet"
    val = read_episodes(val_path)
    val = val[(val["fold"] == fold) & (val["way"] == 1)]
    val_kshot = val[val["shot"] > 1].reset_index(drop=True)
    val = val[val["shot"] == 1].reset_index(drop=True)
    if val.empty:
        raise FscsError(f"{val_path}: no 1-way 1-shot validation episodes for fold {fold}")
    tokens_bytes = budget_bytes(config.memory.tokens_mb, "tokens")
    store = open_features(p["features"], config, index)
    try:
        targets = targets_for(
            supervision,
            config.pseudo,
            store,
            index,
            label_size,
            fold=fold,
            pseudo=p["pseudo"],
            enhancer=p["enhancer"],
            enhanced=p["enhanced"],
            class_names=class_names(folds),
        )
        ids = training_images(index, split, train_classes)
        if not ids:
            raise FscsError(f"{p['index']}: no '{split}' images with fold {fold}'s training classes")
        for rows in (val, val_kshot):
            ids += [str(i) for i in rows["query_id"]] + [
                str(s) for ss in rows["support_ids"] for sh in ss for s in sh
            ]
        tokens = TokenBank(store, tokens_bytes)
        tokens.require(ids, "training images", "re-run `dvc repro extract`")
    except BaseException:
        store.close()  # the cell owns the open store only once it is returned
        raise
    return Cell(
        supervision,
        fold,
        index,
        split,
        train_classes,
        val,
        store,
        targets,
        tokens,
        config.evaluate.void,
        config.memory,
        val_kshot=val_kshot,
    )
