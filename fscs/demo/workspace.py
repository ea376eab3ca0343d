"""What the demo page offers from a workspace: its trained checkpoints and examples from its test episodes."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fscs.errors import FscsError


@dataclass
class CheckpointInfo:
    path: Path
    supervision: str
    fold: int
    trained_on: list[str]  # the fold's training classes: every other class is novel to it

    @property
    def label(self) -> str:
        seen = ", ".join(self.trained_on) if self.trained_on else "unknown"
        return f"{self.supervision} fold {self.fold} (trained on: {seen})"


@dataclass
class Example:
    """A 1-way 1-shot test episode of the workspace: the class, its support (with a binary mask of the class)
    and the query."""

    checkpoint: str  # the label of a checkpoint for which the class is novel
    cls: str
    support: str
    mask: str
    query: str


def _dataset(workspace: Path) -> str | None:
    from fscs.config import read_params

    try:
        params = read_params(workspace / "params.yaml")
    except FscsError:
        return None
    return (params.get("dataset") or {}).get("name")


def _folds(workspace: Path) -> dict | None:
    from fscs.data.folds import read_folds

    name = _dataset(workspace)
    path = workspace / "data" / "episodes" / str(name) / "folds.json"
    if name is None or not path.is_file():
        return None
    try:
        return read_folds(path)
    except FscsError:
        return None


def find_checkpoints(workspace: str | os.PathLike) -> list[CheckpointInfo]:
    """The CST checkpoints under ``models/cst/<setting>/fold<f>.pt``, each with the classes it trained on."""
    from fscs.data.folds import class_names, fold_classes

    root = Path(workspace)
    folds = _folds(root)
    names = class_names(folds) if folds else {}
    found = []
    for path in sorted((root / "models" / "cst").glob("*/fold*.pt")):
        fold_text = path.stem.removeprefix("fold")
        if not fold_text.isdigit():
            continue
        fold = int(fold_text)
        trained = []
        if folds and str(fold) in folds["folds"]:
            trained = [names.get(c, str(c)) for c in fold_classes(folds, fold, "train")]
        found.append(CheckpointInfo(path, path.parent.name, fold, trained))
    return found


def find_examples(
    workspace: str | os.PathLike, checkpoints: list[CheckpointInfo], n: int = 4
) -> list[Example]:
    """Up to ``n`` 1-way 1-shot test episodes of the first checkpoint's fold (classes novel to it), their
    class masks written as binary PNGs to a temporary folder (never into the workspace)."""
    from PIL import Image

    from fscs.data.episodes import read_episodes
    from fscs.data.folds import class_names
    from fscs.data.images import load_mask
    from fscs.data.index import read_index

    root = Path(workspace)
    name, folds = _dataset(root), _folds(root)
    episodes_path = root / "data" / "episodes" / str(name) / "test.parquet"
    index_path = root / "data" / "index" / f"{name}.parquet"
    if not (checkpoints and folds and episodes_path.is_file() and index_path.is_file()):
        return []
    ckpt = checkpoints[0]
    episodes = read_episodes(episodes_path)
    episodes = episodes[(episodes["fold"] == ckpt.fold) & (episodes["way"] == 1) & (episodes["shot"] == 1)]
    index = read_index(index_path)
    names = class_names(folds)
    out_dir = Path(tempfile.mkdtemp(prefix="fscs-demo-examples-"))
    examples, used = [], set()
    for row in episodes.itertuples():
        cls = int(row.support_classes[0])
        support = str(row.support_ids[0][0])
        if cls in used or not row.labels[0] or index.loc[support, "mask_path"] is None:
            continue
        used.add(cls)
        mask = load_mask(index.loc[support, "mask_path"]) == cls
        mask_path = out_dir / f"{support}_class{cls}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        query = str(index.loc[str(row.query_id), "image_path"])
        examples.append(
            Example(
                ckpt.label,
                names.get(cls, str(cls)),
                str(index.loc[support, "image_path"]),
                str(mask_path),
                query,
            )
        )
        if len(examples) == n:
            break
    return examples
