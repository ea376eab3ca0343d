"""MSRC-v2 as Microsoft ships it (BMP images, colour-coded `_GT.bmp` masks) -> the VOC layout the readers use.

The official archive holds `Images/<id>.bmp` and `GroundTruth/<id>_GT.bmp`, where each class is one RGB
colour and black is void. `to_voc` writes `JPEGImages/<id>.jpg` (quality 95), `SegmentationClass/<id>.png`
(class index 1..23, 255 = void), `classes.txt` and the project's fixed 355 / 236 train / val split, so a
downloaded copy is read exactly like the prepared one in the workplace's shared folder. That copy uses the
cleaned-up masks of Malisiewicz & Efros (BMVC 2007); a download has the original, coarser masks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fscs.core.errors import FscsError
from fscs.data.images import VOID

# class index -> (name, colour in the official ground truth); the order of the official class list
CLASSES: dict[int, tuple[str, tuple[int, int, int]]] = {
    1: ("building", (128, 0, 0)),
    2: ("grass", (0, 128, 0)),
    3: ("tree", (128, 128, 0)),
    4: ("cow", (0, 0, 128)),
    5: ("horse", (128, 0, 128)),
    6: ("sheep", (0, 128, 128)),
    7: ("sky", (128, 128, 128)),
    8: ("mountain", (64, 0, 0)),
    9: ("aeroplane", (192, 0, 0)),
    10: ("water", (64, 128, 0)),
    11: ("face", (192, 128, 0)),
    12: ("car", (64, 0, 128)),
    13: ("bicycle", (192, 0, 128)),
    14: ("flower", (64, 128, 128)),
    15: ("sign", (192, 128, 128)),
    16: ("bird", (0, 64, 0)),
    17: ("book", (128, 64, 0)),
    18: ("chair", (0, 192, 0)),
    19: ("road", (128, 64, 128)),
    20: ("cat", (0, 192, 128)),
    21: ("dog", (128, 192, 128)),
    22: ("body", (64, 64, 0)),
    23: ("boat", (192, 64, 0)),
}

# The fixed split: image `<row>_<n>_s` is in val when n is listed for its row, else in train.
VAL_NUMBERS: dict[int, str] = {
    1: "3 6 7 8 9 10 12 13 14 16 18 19 20 23 24 30",
    2: "1 12 13 16 17 20 22 23 24 27 29 30",
    3: "2 5 7 8 9 11 14 16 20 22 24 26",
    4: "3 7 9 10 14 16 17 18 19 20 24 27 30",
    5: "1 2 4 15 18 20 21 22 24 25 26 27 29",
    6: "5 6 7 8 11 12 14 15 19 20 28",
    7: "1 5 6 7 13 14 18 19 20 25 26 28 30",
    8: "3 6 8 10 11 13 14 19 22 24 25 29",
    9: "2 5 6 10 11 14 15 17 22 25 27",
    10: "1 5 6 11 13 14 21 22 24 31",
    11: "2 6 8 11 13 14 17 18 19",
    12: "1 5 8 9 10 12 15 16 17 18 19 27 29 30",
    13: "2 6 8 12 15 17 18 20 23 30",
    14: "1 5 8 10 11 17 20 22 24 28 29 30",
    15: "7 13 14 15 22",
    16: "1 2 4 5 6 8 11 12 15 16 21 24",
    17: "2 4 5 6 8 10 12 18 19 22 25 29",
    18: "5 6 7 8 9 12 13 16 18 21 22 23 24 26 29",
    19: "2 5 7 10 11 13 14 15 16 17 20 21 22 25 26 28",
    20: "4 5 7 8 10 13 19 21",
}


def split_of(image_id: str) -> str:
    """'val' or 'train' for an official image id such as '10_12_s'."""
    row, number = image_id.split("_")[:2]
    return "val" if number in VAL_NUMBERS.get(int(row), "").split() else "train"


def colour_to_index(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) official ground-truth colours -> (H, W) uint8 class indices; black and unknown -> VOID."""
    out = np.full(rgb.shape[:2], VOID, dtype=np.uint8)
    for index, (_, colour) in CLASSES.items():
        out[(rgb == colour).all(axis=-1)] = index
    return out


def to_voc(official: str | os.PathLike, dest: str | os.PathLike) -> int:
    """Convert the extracted official folder (with Images/ and GroundTruth/) into `dest`; returns #images."""
    src, out = Path(official), Path(dest)
    images = sorted((src / "Images").glob("*.bmp"))
    if not images:
        raise FscsError(f"{src}: no Images/*.bmp (not the official MSRC-v2 archive?)")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for path in images:
        gt = src / "GroundTruth" / f"{path.stem}_GT.bmp"
        if not gt.is_file():
            raise FscsError(f"{gt}: ground truth missing for {path.name}")
        Image.open(path).convert("RGB").save(out / "JPEGImages" / f"{path.stem}.jpg", quality=95)
        mask = colour_to_index(np.asarray(Image.open(gt).convert("RGB")))
        Image.fromarray(mask, mode="L").save(out / "SegmentationClass" / f"{path.stem}.png")
        splits[split_of(path.stem)].append(path.stem)
    for split, ids in splits.items():
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / "classes.txt").write_text("".join(f"{i}\t{name}\n" for i, (name, _) in CLASSES.items()))
    return len(images)
