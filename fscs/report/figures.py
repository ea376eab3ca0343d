"""Qualitative figure of the report: query | GT | prediction of each supervision setting, same episodes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from fscs.config.checkpoint import checkpoint_label_size
from fscs.config.params import Config
from fscs.core.overlay import overlay, save_grid
from fscs.data.images import VOID, gt_mask, load_rgb
from fscs.evaluation.episodes import decide


def _episode_gt(mask: np.ndarray, class_id: int) -> np.ndarray:
    """GT of a 1-way episode in absolute ids: the class, background elsewhere, void kept."""
    out = np.where(mask == class_id, class_id, 0).astype(np.uint8)
    out[mask == VOID] = VOID
    return out


def prediction_grid(
    models_dir: str | os.PathLike,
    index_path: str | os.PathLike,
    episodes_dir: str | os.PathLike,
    features_path: str | os.PathLike,
    supervisions: list[str],
    fold: int,
    config: Config,
    out_dir: str | os.PathLike,
    n_episodes: int = 6,
) -> list[str]:
    """Run each setting's fold checkpoint on the first positive 1-way 1-shot test episodes; save one PNG.

    The folder is rebuilt in a temporary sibling and swapped in at the end. Returns the PNG paths."""
    import torch

    from fscs.data.episodes import read_episodes
    from fscs.data.folds import class_names, read_folds
    from fscs.data.index import read_index
    from fscs.features.online import open_features
    from fscs.learn.model.cst import load_checkpoint
    from fscs.learn.predictor import CSTPredictor, TokenBank
    from fscs.learn.targets import targets_for

    torch.use_deterministic_algorithms(True)
    index = read_index(index_path)
    episodes = read_episodes(Path(episodes_dir) / "test.parquet")
    chosen = episodes[
        (episodes["fold"] == fold)
        & (episodes["way"] == 1)
        & (episodes["shot"] == 1)
        & episodes["labels"].map(lambda labels: bool(labels[0]))
    ].head(n_episodes)
    data = Path(features_path).parent.parent
    name = Path(features_path).stem
    columns: list[list[np.ndarray]] = [[] for _ in range(len(chosen))]
    with open_features(features_path, config, index, check=False) as store:
        tokens = TokenBank(store)
        for r, row in enumerate(chosen.itertuples(index=False)):
            query = index.loc[row.query_id]
            support = index.loc[row.support_ids[0][0]]
            class_id = int(row.support_classes[0])
            columns[r] += [
                overlay(
                    load_rgb(support.image_path), _episode_gt(gt_mask(index, row.support_ids[0][0]), class_id)
                ),
                load_rgb(query.image_path),
                overlay(load_rgb(query.image_path), _episode_gt(gt_mask(index, row.query_id), class_id)),
            ]
        for supervision in supervisions:
            checkpoint = Path(models_dir) / supervision / f"fold{fold}.pt"
            model, ckpt = load_checkpoint(checkpoint, store=store)
            label_size = checkpoint_label_size(ckpt, checkpoint)
            targets = targets_for(
                supervision,
                config.pseudo,
                store,
                index,
                label_size,
                fold=fold,
                for_training=False,
                pseudo=str(data / "pseudo" / f"{name}.h5"),
                enhancer=str(Path(models_dir).parent / "enhancer.pt"),
                class_names=class_names(read_folds(Path(episodes_dir) / "folds.json")),
            )
            predictor = CSTPredictor.for_targets(model, tokens, targets, batch_size=32, workers=1)
            for r, row in enumerate(chosen.itertuples(index=False)):
                query = index.loc[row.query_id]
                presence, fg = predictor.predict(row.query_id, row.support_classes, row.support_ids)
                _, labels = decide(presence, fg, (int(query.height), int(query.width)))
                absolute = np.where(labels > 0, int(row.support_classes[0]), 0).astype(np.uint8)
                columns[r].append(overlay(load_rgb(query.image_path), absolute))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    titles = ["support (GT)", "query", "query GT"] + [f"{s} prediction" for s in supervisions]
    save_grid(columns, tmp / f"fold{fold}.png", titles=titles)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return [str(out_dir / f"fold{fold}.png")]
