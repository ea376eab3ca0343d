"""Few-shot episodes: the sampling protocol, the fixed test/validation lists and the training sampler.

Protocol (METHOD.md §1), for a split and a set of C classes:
1. the query is an (image, class) entry of the split, picked uniformly over all entries (one per image per
   listed class in the image's `classes`), so images with several classes are proportionally likelier;
2. the N support classes are drawn without replacement, weight 1/2 for the query's class and 1/(2(C-1))
   for each other class, renormalised after each draw; they are stored in ascending id order;
3. the label of a support class is 1 if it is in the query's `classes` (image-level labels after the
   min-area rule, any class of the image counts, not only the listed ones);
4. for each support class, K distinct images of the split having that class, never the query. The same
   image may serve two different support classes of one episode (as in the reference code).

Randomness uses only `Generator.random()` (uniform doubles) of numpy's PCG64, whose stream numpy keeps
stable, so episode lists are the same on every run and platform. Episode i of a list comes from
`Generator(PCG64(seed + i))`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fscs.core.errors import FscsError
from fscs.data.index import write_parquet

EPISODE_SCHEMA = pa.schema(
    [
        ("fold", pa.int64()),
        ("episode", pa.int64()),
        ("way", pa.int64()),
        ("shot", pa.int64()),
        ("query_id", pa.string()),
        ("support_classes", pa.list_(pa.int64())),
        ("support_ids", pa.list_(pa.list_(pa.string()))),
        ("labels", pa.list_(pa.int64())),
    ]
)
EPISODE_COLUMNS = tuple(EPISODE_SCHEMA.names)
TOO_FEW = ("error", "drop")


@dataclass
class Episode:
    """One N-way K-shot episode; `support_ids[n]` are the K images of `support_classes[n]`."""

    query_id: str
    support_classes: list[int]
    support_ids: list[list[str]]
    labels: list[int]
    way: int
    shot: int
    query_class: int = field(default=0, compare=False)  # the class of the drawn (image, class) entry

    def row(self, fold: int, episode: int) -> dict[str, Any]:
        return {
            "fold": fold,
            "episode": episode,
            "way": self.way,
            "shot": self.shot,
            "query_id": self.query_id,
            "support_classes": list(self.support_classes),
            "support_ids": [list(ids) for ids in self.support_ids],
            "labels": list(self.labels),
        }


def rng_for(seed: int) -> np.random.Generator:
    """The generator of one episode (or of a sampler's stream)."""
    return np.random.Generator(np.random.PCG64(int(seed)))


def _below(rng: np.random.Generator, n: int) -> int:
    """A uniform integer in [0, n) from one uniform double."""
    return min(int(rng.random() * n), n - 1)


class EpisodeSampler:
    """Draws episodes of one (way, shot) from one split and class set of an index.

    `index` is the image-index frame (columns image_id, split, classes); `classes` the class ids episodes
    may use (query entries and support classes). Construction checks that every class has at least
    shot + 1 images in the split and that there are at least `way` classes; `class_names` (id -> name)
    makes those errors readable. With `too_few="drop"` a class with fewer than shot + 1 images is left
    out instead (neither query entry nor support class) and listed in `self.dropped` as (class, count).
    """

    def __init__(
        self,
        index: pd.DataFrame,
        classes: Iterable[int],
        split: str,
        way: int = 1,
        shot: int = 1,
        class_names: dict[int, str] | None = None,
        too_few: str = "error",
    ) -> None:
        if too_few not in TOO_FEW:
            raise FscsError(
                f"params: episodes.too_few_images must be one of {', '.join(TOO_FEW)}, got {too_few!r}"
            )
        self.split = split
        self.way = int(way)
        self.shot = int(shot)
        self.classes = sorted({int(c) for c in classes})
        names = class_names or {}
        if self.way < 1 or self.shot < 1:
            raise FscsError(f"episodes need way >= 1 and shot >= 1, got {way}-way {shot}-shot")
        counts = {c: 0 for c in self.classes}
        for image_split, image_classes in zip(index["split"], index["classes"], strict=True):
            if image_split == split:
                for c in image_classes:
                    if int(c) in counts:
                        counts[int(c)] += 1
        self.dropped: list[tuple[int, int]] = []
        for c in self.classes:
            if counts[c] < self.shot + 1:
                if too_few == "drop":
                    self.dropped.append((c, counts[c]))
                    continue
                label = f"class {c} ({names[c]})" if c in names else f"class {c}"
                raise FscsError(
                    f"{label} has {counts[c]} image(s) in split '{split}'; {self.shot}-shot episodes need at "
                    f"least {self.shot + 1} (the query plus {self.shot} support images)"
                )
        self.classes = [c for c in self.classes if c not in dict(self.dropped)]
        if self.way > len(self.classes):
            raise FscsError(
                f"{self.way}-way episodes need at least {self.way} classes with {self.shot + 1}+ images in "
                f"split '{split}', only {len(self.classes)} of {len(counts)} have"
            )
        wanted = set(self.classes)
        self.image_classes: dict[str, frozenset[int]] = {}
        self.by_class: dict[int, list[str]] = {c: [] for c in self.classes}
        self.entries: list[tuple[str, int]] = []
        for image_id, image_split, image_classes in zip(
            index["image_id"], index["split"], index["classes"], strict=True
        ):
            if image_split != split:
                continue
            cs = [int(c) for c in image_classes]
            self.image_classes[image_id] = frozenset(cs)
            for c in cs:
                if c in wanted:
                    self.by_class[c].append(image_id)
                    self.entries.append((image_id, c))

    def sample(self, rng: np.random.Generator) -> Episode:
        """One episode drawn with `rng` (see the module docstring for the protocol)."""
        query_id, query_class = self.entries[_below(rng, len(self.entries))]
        others = [c for c in self.classes if c != query_class]
        pool = [query_class] + others
        weights = [0.5] + [0.5 / len(others)] * len(others) if others else [1.0]
        chosen: list[int] = []
        for _ in range(self.way):
            total = sum(weights)
            u = rng.random() * total
            pick = len(pool) - 1
            acc = 0.0
            for j, w in enumerate(weights):
                acc += w
                if u < acc:
                    pick = j
                    break
            chosen.append(pool.pop(pick))
            weights.pop(pick)
        support_classes = sorted(chosen)
        support_ids = []
        for c in support_classes:
            candidates = self.by_class[c]
            picked: list[str] = []
            while len(picked) < self.shot:
                image_id = candidates[_below(rng, len(candidates))]
                if image_id != query_id and image_id not in picked:
                    picked.append(image_id)
            support_ids.append(picked)
        present = self.image_classes[query_id]
        labels = [int(c in present) for c in support_classes]
        return Episode(query_id, support_classes, support_ids, labels, self.way, self.shot, query_class)

    def episode(self, seed: int) -> Episode:
        """The episode drawn from `Generator(PCG64(seed))`."""
        return self.sample(rng_for(seed))


class TrainEpisodeSampler(EpisodeSampler):
    """Training episodes: the protocol on the train split, restricted to a fold's training classes.

    `sample(rng)` draws with the caller's generator; iterating gives an endless stream from one generator
    seeded with `seed`; `episode(i)` gives the episode of `seed + i` (repeatable regardless of order).
    """

    def __init__(
        self,
        index: pd.DataFrame,
        train_classes: Iterable[int],
        split: str,
        way: int = 1,
        shot: int = 1,
        seed: int = 0,
        class_names: dict[int, str] | None = None,
        too_few: str = "error",
    ) -> None:
        super().__init__(index, train_classes, split, way, shot, class_names, too_few)
        self.seed = int(seed)

    def episode(self, i: int) -> Episode:  # type: ignore[override]
        return self.sample(rng_for(self.seed + int(i)))

    def __iter__(self) -> Iterator[Episode]:
        rng = rng_for(self.seed)
        while True:
            yield self.sample(rng)


def build_episodes(
    index: pd.DataFrame,
    classes: Iterable[int],
    split: str,
    way: int,
    shot: int,
    n: int,
    seed: int,
    fold: int = 0,
    class_names: dict[int, str] | None = None,
    too_few: str = "error",
) -> list[dict[str, Any]]:
    """Rows (dicts with the episode columns) of episodes 0..n-1 of one (way, shot), episode i drawn from
    seed + i. For the classes left out under too_few="drop", use `EpisodeSampler` directly."""
    sampler = EpisodeSampler(index, classes, split, way, shot, class_names, too_few)
    return [sampler.episode(seed + i).row(fold, i) for i in range(int(n))]


def episode_lists(
    index: pd.DataFrame,
    folds: dict[str, Any],
    role: str,
    ways: Iterable[int],
    shots: Iterable[int],
    n: int,
    seed: int,
    too_few: str = "error",
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Test (role "test": test split, fold's test classes) or validation (role "val": train split, fold's
    training classes) episodes for every fold and (way, shot), as one frame in (fold, way, shot, episode)
    order, plus the classes left out for too few images (too_few="drop"), one dict per (fold, shot, class).
    """
    if role not in ("test", "val"):
        raise ValueError(role)
    split = folds["test_split"] if role == "test" else folds["train_split"]
    key = "test" if role == "test" else "train"
    names = {int(c): name for c, name in folds["classes"].items()}
    rows: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for fold in sorted(folds["folds"], key=int):
        for way in ways:
            for shot in shots:
                sampler = EpisodeSampler(index, folds["folds"][fold][key], split, way, shot, names, too_few)
                rows += [sampler.episode(seed + i).row(int(fold), i) for i in range(int(n))]
                for c, count in sampler.dropped:
                    entry = {
                        "episodes": role,
                        "fold": int(fold),
                        "shot": shot,
                        "class": c,
                        "name": names.get(c),
                        "split": split,
                        "images": count,
                    }
                    if entry not in dropped:
                        dropped.append(entry)
    return pd.DataFrame(rows, columns=list(EPISODE_COLUMNS)), dropped


def episodes_table(frame: pd.DataFrame) -> pa.Table:
    data = {name: list(frame[name]) for name in EPISODE_COLUMNS}
    for name in ("fold", "episode", "way", "shot"):
        data[name] = [int(v) for v in data[name]]
    return pa.Table.from_pydict(data, schema=EPISODE_SCHEMA)


def write_episodes(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    write_parquet(episodes_table(frame), path)


def read_episodes(path: str | os.PathLike) -> pd.DataFrame:
    """An episode list (test.parquet / val.parquet) with list columns as python lists."""
    if not os.path.isfile(path):
        raise FscsError(f"{path}: episode file not found (run the prepare stage)")
    table = pq.read_table(path)
    missing = [c for c in EPISODE_COLUMNS if c not in table.column_names]
    if missing:
        raise FscsError(f"{path}: not an episode file (missing columns {missing})")
    return pd.DataFrame({name: table.column(name).to_pylist() for name in EPISODE_COLUMNS})


def to_episode(row: Any) -> Episode:
    """An Episode from a row of an episode frame (e.g. `frame.iloc[i]` or an itertuples row)."""
    get = row.__getitem__ if isinstance(row, dict | pd.Series) else lambda k: getattr(row, k)
    return Episode(
        str(get("query_id")),
        [int(c) for c in get("support_classes")],
        [[str(i) for i in ids] for ids in get("support_ids")],
        [int(v) for v in get("labels")],
        int(get("way")),
        int(get("shot")),
    )
