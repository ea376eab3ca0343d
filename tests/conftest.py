"""Shared fixtures. `voc_fixture`: a tiny VOC-layout dataset (6 classes, 2 splits) built in tmp_path;
`tiny_reproduced`: the tiny project reproduced once with `dvc repro` (for the end-to-end tests)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tiny_repo import make_tiny_repo, run, tiny_env


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


VOC_FIXTURE_CLASSES = {1: "cat", 2: "dog", 3: "sky", 4: "tree", 5: "car", 6: "boat"}


def build_voc(root: Path, per_class: int = 7, height: int = 24, width: int = 32, seed: int = 0) -> dict:
    """Write a VOC-layout dataset under `root`; returns {image_id: (split, sorted labelled classes)}.

    For each split (train, val) and class c: `per_class` images whose left half is c; odd-numbered images
    also hold the next class (c % 6 + 1) in a 6x6 square (36 px, above the 1% rule), every image holds one
    pixel of the class after that (below 1%), and the top row is void (255). Background is 0.
    """
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{i}\t{n}\n" for i, n in VOC_FIXTURE_CLASSES.items()))
    labels = {}
    for split in ("train", "val"):
        ids = []
        for c in VOC_FIXTURE_CLASSES:
            for k in range(per_class):
                image_id = f"{split}_{c}_{k}"
                mask = np.zeros((height, width), dtype=np.uint8)
                mask[:, : width // 2] = c
                classes = {c}
                if k % 2 == 1:
                    second = c % 6 + 1
                    mask[10:16, 20:26] = second
                    classes.add(second)
                mask[20, 30] = (c + 1) % 6 + 1
                mask[0, :] = 255
                image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
                Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / f"{image_id}.png")
                labels[image_id] = (split, sorted(classes))
                ids.append(image_id)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return labels


@pytest.fixture
def voc_fixture(tmp_path):
    """A tiny VOC dataset: `.root` (Path), `.labels` {image_id: (split, classes)}, `.classes` {id: name},
    `.params` (dataset/folds/episodes sections for it: 2 folds of 3 classes, 1/2-way x 1/5-shot, 20 test
    and 5 val episodes per fold and setting)."""
    root = tmp_path / "voc"
    labels = build_voc(root)
    params = {
        "dataset": {
            "name": "tiny",
            "root": str(root),
            "layout": "voc",
            "train_split": "train",
            "test_split": "val",
            "exclude_classes": [],
            "min_class_pixels": 0.01,
        },
        "folds": {"n": 2, "order": "contiguous"},
        "episodes": {"seed": 0, "test_per_fold": 20, "val_per_fold": 5, "ways": [1, 2], "shots": [1, 5]},
    }
    return SimpleNamespace(root=root, labels=labels, classes=dict(VOC_FIXTURE_CLASSES), params=params)


@pytest.fixture(scope="session")
def tiny_reproduced(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A git+DVC copy of the project with a tiny params.yaml, reproduced once with `dvc repro` and committed.
    Tests that change it restore it with git."""
    repo = tmp_path_factory.mktemp("tiny") / "repo"
    env = tiny_env(repo.parent)
    make_tiny_repo(repo, env)
    run(["dvc", "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny run"], repo, env)
    return repo, env
