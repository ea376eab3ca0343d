"""Class folds: which classes each fold tests on and trains on.

The included classes (all dataset classes minus `dataset.exclude_classes`, by name) are sorted by id and
split into `folds.n` groups:
- `contiguous` (Pascal-5i): consecutive runs, sizes as numpy.array_split gives them (20 classes / 4 folds:
  fold i = classes 5i+1..5i+5; MSRC's 21 classes / 4 folds: 6, 5, 5, 5);
- `interleaved` (COCO-20i): fold i = every n-th class starting at the i-th (80 classes / 4 folds:
  fold i = {i+1, i+5, ..., i+77}).
A fold trains on the included classes it does not test on.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from fscs.core.errors import FscsError

ORDERS = ("contiguous", "interleaved")


def included_classes(classes: dict[int, str], exclude: list[str] | None) -> list[int]:
    """Sorted ids of the classes whose names are not in `exclude`; an unknown name is an error."""
    by_name = {name: cid for cid, name in classes.items()}
    for name in exclude or []:
        if name not in by_name:
            raise FscsError(
                f"params: dataset.exclude_classes names class {name!r}, which is not in the dataset's class "
                f"list ({', '.join(classes.values())})"
            )
    dropped = {by_name[name] for name in exclude or []}
    return sorted(cid for cid in classes if cid not in dropped)


def split_folds(included: list[int], n: int, order: str) -> dict[int, dict[str, list[int]]]:
    """{fold: {"test": ids, "train": ids}} for `n` folds over `included` (sorted)."""
    if order not in ORDERS:
        raise FscsError(f"params: folds.order must be one of {', '.join(ORDERS)}, got {order!r}")
    if not isinstance(n, int) or n < 1:
        raise FscsError(f"params: folds.n must be a positive integer, got {n!r}")
    if n > len(included):
        raise FscsError(f"params: folds.n = {n} but only {len(included)} classes are included")
    ids = sorted(int(c) for c in included)
    if order == "contiguous":
        groups = [[int(c) for c in part] for part in np.array_split(np.array(ids), n)]
    else:
        groups = [ids[i::n] for i in range(n)]
    return {
        f: {"test": group, "train": [c for c in ids if c not in set(group)]} for f, group in enumerate(groups)
    }


def make_folds(
    dataset_name: str,
    classes: dict[int, str],
    exclude: list[str] | None,
    n: int,
    order: str,
    train_split: str,
    test_split: str,
) -> dict[str, Any]:
    """The folds.json document (docs/ARCHITECTURE.md)."""
    included = included_classes(classes, exclude)
    folds = split_folds(included, n, order)
    return {
        "dataset": dataset_name,
        "classes": {str(cid): name for cid, name in sorted(classes.items())},
        "included": included,
        "order": order,
        "folds": {str(f): spec for f, spec in folds.items()},
        "train_split": train_split,
        "test_split": test_split,
    }


def read_folds(path: str | os.PathLike) -> dict[str, Any]:
    """Load folds.json as written by the prepare stage (keys as in the file: fold ids are strings)."""
    if not os.path.isfile(path):
        raise FscsError(f"{path}: folds file not found (run the prepare stage)")
    try:
        doc = json.loads(open(path).read())
    except json.JSONDecodeError as exc:
        raise FscsError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("dataset", "classes", "included", "order", "folds", "train_split", "test_split"):
        if key not in doc:
            raise FscsError(f"{path}: not a folds file (no '{key}')")
    return doc


def fold_classes(folds: dict[str, Any], fold: int | str, role: str) -> list[int]:
    """The test or train class ids of a fold from a folds document (the one reader of a fold's classes)."""
    key = str(fold)
    if key not in folds["folds"]:
        raise FscsError(f"fold {fold} not in folds file (folds: {', '.join(folds['folds'])})")
    if role not in ("test", "train"):
        raise ValueError(role)
    return [int(c) for c in folds["folds"][key][role]]


def class_names(folds: dict[str, Any]) -> dict[int, str]:
    """{class id: name} of the dataset the folds file was made from."""
    return {int(c): str(n) for c, n in folds["classes"].items()}


def training_classes(folds: dict[str, Any], fold: int | str) -> list[int]:
    """The fold's training classes that 1-way 1-shot training episodes can use.

    A class prepare recorded in ``too_few_images`` (``episodes.too_few_images: drop``) with fewer than 2
    images in the train split is left out: the rule the fold's validation episodes already follow."""
    rare = {
        int(d["class"])
        for d in folds.get("too_few_images", [])
        if d["split"] == folds["train_split"] and int(d["fold"]) == int(fold) and int(d["images"]) < 2
    }
    return [c for c in fold_classes(folds, fold, "train") if c not in rare]
