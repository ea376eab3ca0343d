"""COCO layouts: instance JSON rendered to semantic masks, or preprocessed per-image PNG masks.

`coco_json`: `root/annotations/instances_<split>.json` and images `root/<split>/<file_name>`. The JSON's
categories, sorted by category id, map to contiguous class ids 1..C (1..80 for COCO, in COCO's usual
order). Each image's instances are rendered with pycocotools into one class-index mask:
- non-crowd instances (polygons or RLE) are painted largest area first, so a smaller object lying on a
  larger one stays visible;
- crowd regions (`iscrowd=1`, RLE) become void (255) wherever no non-crowd instance was painted: they mark
  "some of this class, not delineated", which we neither train on nor score. A class seen only as crowd is
  therefore not an image-level label of that image.
Rendered masks are cached as PNGs in `cache_dir/<split>/<image_id>.png` (a stamp file records the JSON's
size and mtime; a changed JSON re-renders), so the index points at real mask files.

`coco_png`: images `root/<split>/<id>.jpg`, masks `root/<mask_dir>/<split>/<id>.png` with pixel value =
class id 1..80 (0 background, 255 void), as used by COCO-20i work; the split is every mask in that folder.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from fscs.core.errors import FscsError
from fscs.core.io import atomic_path, write_json
from fscs.data import voc
from fscs.data.images import VOID, load_mask
from fscs.data.index_row import record

COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


def load_instances(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FscsError(f"{path}: COCO instances file not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FscsError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise FscsError(f"{path}: not a COCO instances file (no '{key}' list)")
    return data


def category_map(categories: list[dict[str, Any]]) -> tuple[dict[int, int], dict[int, str]]:
    """(COCO category id -> contiguous class id 1..C in category-id order, {class id: name})."""
    cats = sorted(categories, key=lambda c: int(c["id"]))
    if len(cats) > 254:
        raise FscsError(f"{len(cats)} categories do not fit in an 8-bit mask (at most 254)")
    to_class = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
    names = {i + 1: str(c["name"]) for i, c in enumerate(cats)}
    return to_class, names


def _rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation, dict):  # compressed RLE
        return segmentation
    raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")


def render_semantic_mask(
    annotations: list[dict[str, Any]], height: int, width: int, to_class: dict[int, int]
) -> np.ndarray:
    """One image's instances as a class-index mask (uint8): largest non-crowd first, crowd -> void."""
    from pycocotools import mask as mask_utils

    mask = np.zeros((height, width), dtype=np.uint8)
    painted = np.zeros((height, width), dtype=bool)
    things = [a for a in annotations if not a.get("iscrowd", 0)]
    crowds = [a for a in annotations if a.get("iscrowd", 0)]
    things.sort(key=lambda a: (-float(a.get("area", 0.0)), int(a.get("id", 0))))

    def region(ann: dict[str, Any]) -> np.ndarray:
        with warnings.catch_warnings():  # pycocotools' decode trips numpy 2's copy-keyword deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(_rle(ann["segmentation"], height, width)).astype(bool)

    for ann in things:
        r = region(ann)
        mask[r] = to_class[int(ann["category_id"])]
        painted |= r
    for ann in crowds:
        mask[region(ann) & ~painted] = VOID
    return mask


def _save_png(mask: np.ndarray, path: str) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(mask, mode="L").save(tmp, format="PNG")


def coco_json_rows(
    root: str, splits: list[str], min_class_pixels: float, cache_dir: str
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Index rows of a COCO instances-JSON dataset, rendering (or reusing) cached masks."""
    if not os.path.isdir(root):
        raise FscsError(f"{root}: dataset folder not found")
    datasets = {}
    for split in splits:
        path = os.path.join(root, "annotations", f"instances_{split}.json")
        datasets[split] = (path, load_instances(path))
        if not os.path.isdir(os.path.join(root, split)):
            raise FscsError(f"{os.path.join(root, split)}: image folder of split '{split}' not found")
    to_class: dict[int, int] = {}
    names: dict[int, str] = {}
    for path, data in datasets.values():
        t, n = category_map(data["categories"])
        if names and (t, n) != (to_class, names):
            raise FscsError(f"{path}: categories differ from those of split '{splits[0]}'")
        to_class, names = t, n
    rows = []
    for split, (path, data) in datasets.items():
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            if int(ann["category_id"]) not in to_class:
                raise FscsError(
                    f"{path}: annotation {ann.get('id')} has unknown category {ann['category_id']}"
                )
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
        split_cache = os.path.join(cache_dir, split)
        stat = os.stat(path)
        stamp = {"source": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        stamp_path = os.path.join(split_cache, "stamp.json")
        fresh = False
        if os.path.isfile(stamp_path):
            try:
                fresh = json.loads(open(stamp_path).read()) == stamp
            except json.JSONDecodeError:
                fresh = False
        images = sorted(data["images"], key=lambda im: (os.path.splitext(im["file_name"])[0], int(im["id"])))
        for image in tqdm(images, desc=f"render {split}", unit="img", disable=None, leave=False):
            image_id = os.path.splitext(os.path.basename(image["file_name"]))[0]
            image_path = os.path.join(root, split, image["file_name"])
            mask_path = os.path.join(split_cache, f"{image_id}.png")
            height, width = int(image["height"]), int(image["width"])
            mask = None
            if fresh and os.path.isfile(mask_path):
                mask = load_mask(mask_path)
            if mask is None or mask.shape != (height, width):
                try:
                    mask = render_semantic_mask(by_image.get(int(image["id"]), []), height, width, to_class)
                except (ValueError, KeyError, TypeError) as exc:
                    raise FscsError(
                        f"{path}: bad segmentation for image {image['file_name']} ({exc})"
                    ) from exc
                _save_png(mask, mask_path)
            rows.append(record(image_id, split, image_path, mask_path, names, min_class_pixels, mask=mask))
        if not fresh:
            write_json(stamp_path, stamp)
    return rows, names


def coco_png_rows(
    root: str, splits: list[str], min_class_pixels: float, mask_dir: str = "annotations"
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Index rows of the preprocessed PNG layout (value = class id 1..80)."""
    if not os.path.isdir(root):
        raise FscsError(f"{root}: dataset folder not found")
    names = voc.read_class_list(root, default=COCO_CLASSES)
    listing = {}
    for split in splits:
        masks = voc.sub_path(root, os.path.join(mask_dir, split))
        images = os.path.join(root, split)
        for folder, what in ((images, "image"), (masks, "mask")):
            if not os.path.isdir(folder):
                raise FscsError(f"{folder}: {what} folder of split '{split}' not found")
        stems = sorted(os.path.splitext(f)[0] for f in os.listdir(masks) if f.endswith(".png"))
        if not stems:
            raise FscsError(f"{masks}: no PNG masks for split '{split}'")
        listing[split] = (images, masks, stems)
    rows = []
    for split, (images, masks, stems) in listing.items():
        for stem in tqdm(stems, desc=f"index {split}", unit="img", disable=None, leave=False):
            image_path = os.path.join(images, f"{stem}.jpg")
            rows.append(
                record(stem, split, image_path, os.path.join(masks, f"{stem}.png"), names, min_class_pixels)
            )
    return rows, names
