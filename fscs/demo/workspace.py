"""What the demo page offers from a workspace: its trained checkpoints and examples from its test episodes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fscs.core.errors import FscsError


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
    from fscs.config.params import load_config

    try:
        config = load_config(workspace / "params.yaml")
    except FscsError:
        return None
    return config.dataset.name if config.dataset is not None else None


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
    """The CST checkpoints under ``models/cst/<setting>/fold<f>.pt``, each with the classes it trained on,
    the pixel setting's first."""
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
    # pixel first: the page's default checkpoint, the one trained with the masks a user can give it
    return sorted(found, key=lambda c: (c.supervision != "pixel", c.supervision, c.fold))


@dataclass
class TestEpisode:
    """One of the workspace's test episodes as files: per class its name and K (image, binary mask) pairs."""

    classes: list[str]
    supports: list[list[tuple[str, str]]]
    query: str
    present: list[bool]


def test_episodes(workspace: str | os.PathLike, fold: int, way: int, shot: int) -> Iterator[TestEpisode]:
    """The workspace's test episodes of one fold and type, in order; the support masks of each class are
    written as binary PNGs to a temporary folder (never into the workspace) as the episodes are read."""
    from fscs.data.episodes import read_episodes
    from fscs.data.folds import class_names
    from fscs.data.index import read_index

    root = Path(workspace)
    name, folds = _dataset(root), _folds(root)
    episodes_path = root / "data" / "episodes" / str(name) / "test.parquet"
    index_path = root / "data" / "index" / f"{name}.parquet"
    if not (folds and episodes_path.is_file() and index_path.is_file()):
        return
    episodes = read_episodes(episodes_path)
    episodes = episodes[(episodes["fold"] == fold) & (episodes["way"] == way) & (episodes["shot"] == shot)]
    index = read_index(index_path)
    names = class_names(folds)
    out_dir = Path(tempfile.mkdtemp(prefix="fscs-demo-examples-"))

    def files(image_id: str, cls: int) -> tuple[str, str]:
        return str(index.loc[image_id, "image_path"]), _class_mask(index, image_id, cls, out_dir)

    for row in episodes.itertuples():
        ids = [[str(i) for i in shots] for shots in row.support_ids]
        if any(index.loc[i, "mask_path"] is None for shots in ids for i in shots):
            continue
        yield TestEpisode(
            [names.get(int(c), str(c)) for c in row.support_classes],
            [[files(i, int(c)) for i in shots] for c, shots in zip(row.support_classes, ids, strict=True)],
            str(index.loc[str(row.query_id), "image_path"]),
            [bool(v) for v in row.labels],
        )


def _class_mask(index, image_id: str, cls: int, out_dir: Path) -> str:
    """A binary PNG (255 = class ``cls``) of an image's GT mask, written to ``out_dir`` once."""
    from PIL import Image

    from fscs.data.images import load_mask

    path = out_dir / f"{image_id}_class{cls}.png"
    if not path.is_file():
        mask = load_mask(index.loc[image_id, "mask_path"]) == cls
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return str(path)


def find_examples(
    workspace: str | os.PathLike, checkpoints: list[CheckpointInfo], n: int = 4
) -> list[Example]:
    """Up to ``n`` 1-way 1-shot test episodes of the first checkpoint's fold, one per class (classes novel to
    it), whose query shows the class."""
    if not checkpoints:
        return []
    ckpt, examples, seen = checkpoints[0], [], set()
    for ep in test_episodes(workspace, ckpt.fold, 1, 1):
        if ep.classes[0] in seen or not ep.present[0]:
            continue
        seen.add(ep.classes[0])
        ((support, mask),) = ep.supports[0]
        examples.append(Example(ckpt.label, ep.classes[0], support, mask, ep.query))
        if len(examples) == n:
            break
    return examples
