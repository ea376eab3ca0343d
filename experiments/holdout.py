"""Validation on held-out classes: an inner split of a fold's training classes, so a learner choice is
ranked by how the model does on classes it never trained on, as the test episodes rank it.

The pipeline's validation episodes use the fold's training classes (the classes the model trains on);
sweep 4 of reports/LEARNER.md showed that they can rank a choice the wrong way round for novel classes.
Here every ``every``-th training class (ascending ids, starting at position ``fold % every``) is held
out: the cell trains on the others and validates on 1-way 1-shot episodes of the held-out classes, drawn
from the training split (the test split is never read). Held-out classes may still appear, unlabelled, in
the background of training images, as test classes do in the outer protocol.
"""

from __future__ import annotations

import dataclasses

import pandas as pd

from fscs.data.episodes import EPISODE_COLUMNS, EpisodeSampler
from fscs.errors import FscsError
from fscs.train_cell import Cell


def held_out_classes(train_classes: list[int], fold: int, every: int = 4) -> list[int]:
    """Every ``every``-th of the sorted training classes, starting at position ``fold % every``."""
    if every < 2:
        raise FscsError(f"holdout: every must be >= 2 (one class in {every} held out), got {every}")
    return sorted(train_classes)[fold % every :: every]


def holdout_cell(cell: Cell, every: int = 4, episodes: int = 200, seed: int = 0) -> Cell:
    """The cell trained on its training classes minus the held-out ones, validated on ``episodes`` 1-way
    1-shot episodes of the held-out classes (episode i from ``seed + i``, as the prepare stage draws)."""
    held = held_out_classes(cell.train_classes, cell.fold, every)
    sampler = EpisodeSampler(cell.index, held, cell.split, way=1, shot=1, too_few="drop")
    if not sampler.classes:
        raise FscsError(f"fold {cell.fold}: no held-out class has 2+ '{cell.split}' images")
    rows = [sampler.episode(seed + i).row(cell.fold, i) for i in range(int(episodes))]
    val = pd.DataFrame(rows, columns=list(EPISODE_COLUMNS))
    kept = [c for c in cell.train_classes if c not in set(held)]
    return dataclasses.replace(cell, train_classes=kept, val=val, val_classes=sampler.classes)
