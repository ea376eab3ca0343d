"""One image-index row: the image's size and its image-level labels under the min-area rule.

Min-area rule (`dataset.min_class_pixels`, see `min_pixels`): a class present in a mask is an image-level
label only if it covers at least that many pixels; a value < 1 is a fraction of the image's pixels (void
included), a value >= 1 an absolute pixel count. Void (255) and background (0) are never labels.

Shared by every dataset layout (`fscs.data.index` for VOC, `fscs.data.coco` for COCO).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from fscs.core.errors import FscsError
from fscs.data.images import VOID, load_mask, load_rgb


def min_pixels(min_class_pixels: float, height: int, width: int) -> int:
    """The pixel count a class needs to be a label: a fraction (< 1) of height*width, else a count (>= 1).

    Returns at least 1, so a class needs at least one pixel whatever the setting.
    """
    value = float(min_class_pixels)
    if not value >= 0 or math.isinf(value):
        raise FscsError(f"params: dataset.min_class_pixels must be >= 0, got {min_class_pixels!r}")
    if value < 1:
        return max(1, math.ceil(value * height * width))
    return max(1, math.ceil(value))


def image_labels(
    mask: np.ndarray, class_ids: Iterable[int], min_class_pixels: float, mask_path: str
) -> tuple[list[int], list[int]]:
    """(classes, class_pixels) of a class-index mask under the min-area rule.

    A pixel value that is neither 0, 255 nor a known class id is an error naming the mask file.
    """
    counts = np.bincount(mask.ravel(), minlength=256)
    known = set(int(c) for c in class_ids)
    present = [int(v) for v in np.flatnonzero(counts) if v not in (0, VOID)]
    unknown = [v for v in present if v not in known]
    if unknown:
        raise FscsError(f"{mask_path}: mask values {unknown} are not class ids of the dataset (nor 0 or 255)")
    need = min_pixels(min_class_pixels, mask.shape[0], mask.shape[1])
    classes = [v for v in present if counts[v] >= need]
    return classes, [int(counts[v]) for v in classes]


def image_size(image_path: str) -> tuple[int, int]:
    """(height, width) of an image, decoding it fully so a broken file is caught here."""
    image = load_rgb(image_path)
    return int(image.shape[0]), int(image.shape[1])


def check_mask_size(mask: np.ndarray, mask_path: str, height: int, width: int, image_path: str) -> None:
    if mask.shape != (height, width):
        raise FscsError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} "
            f"is {width}x{height}"
        )


def record(
    image_id: str,
    split: str,
    image_path: str,
    mask_path: str | None,
    class_ids: Iterable[int],
    min_class_pixels: float,
    mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """One index row: decodes the image (size) and the mask (labels; `mask` if given, else read)."""
    height, width = image_size(image_path)
    classes: list[int] = []
    pixels: list[int] = []
    if mask_path is not None:
        if mask is None:
            mask = load_mask(mask_path)
        check_mask_size(mask, mask_path, height, width, image_path)
        classes, pixels = image_labels(mask, class_ids, min_class_pixels, mask_path)
    return {
        "image_id": image_id,
        "split": split,
        "image_path": image_path,
        "mask_path": mask_path,
        "height": height,
        "width": width,
        "classes": classes,
        "class_pixels": pixels,
    }
