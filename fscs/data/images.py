"""Decoding images and index masks, with errors that name the file; the one ground-truth mask reader."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from fscs.core.errors import FscsError

if TYPE_CHECKING:
    import pandas as pd

#: The label of void pixels in every index mask (ignored or counted as background by the metrics).
VOID = 255

#: Environment variable that raises Pillow's decompression-bomb limit (pixels) for images meant to be huge.
PIXEL_LIMIT_ENV = "FSCS_MAX_IMAGE_PIXELS"

_PILLOW_PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS

#: Pillow modes of greyscale images wider than 8 bits (16-bit PNGs open as one of these).
WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@contextmanager
def open_image(path: str | os.PathLike, what: str = "image") -> Iterator[Image.Image]:
    """`Image.open` whose failures (inside the block too) become one FscsError line naming the file."""
    limit = os.environ.get(PIXEL_LIMIT_ENV)
    Image.MAX_IMAGE_PIXELS = int(limit) if limit else _PILLOW_PIXEL_LIMIT
    try:
        with Image.open(path) as im:
            yield im
    except FileNotFoundError as exc:
        raise FscsError(f"{path}: {what} file not found") from exc
    except Image.DecompressionBombError as exc:
        raise FscsError(
            f"{path}: {what} is past Pillow's decompression-bomb limit ({exc}); if it is meant to be this "
            f"large, set {PIXEL_LIMIT_ENV} to its pixel count or more"
        ) from None
    except FscsError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ...) for broken files
        raise FscsError(f"{path}: {what} does not decode ({exc})") from exc


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as an RGB uint8 array (H, W, 3); 16-bit greyscale is scaled to 8 bits, not clipped."""
    with open_image(path) as im:
        if im.mode in WIDE_GREY:
            grey = np.asarray(im).astype(np.int64)
            if grey.min(initial=0) < 0 or grey.max(initial=0) > 65535:
                raise FscsError(f"{path}: {im.mode} image values outside 0..65535")
            grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        if im.mode == "F":
            raise FscsError(f"{path}: floating-point ({im.mode}) images are not supported; save as 8/16-bit")
        return np.asarray(im.convert("RGB"))


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a class-index mask (palette or grey PNG) as uint8 (H, W); 0 background, 255 void.

    A 16-bit mask is accepted when every value fits a class id (0..255); a larger value is refused, not
    wrapped around (263 would otherwise read as class 7)."""
    with open_image(path, "mask") as im:
        if im.mode not in ("P", "L", *WIDE_GREY):
            raise FscsError(f"{path}: mask must be a palette or greyscale index PNG, got mode {im.mode}")
        mask = np.asarray(im)
    if mask.dtype != np.uint8:
        bad = mask[(mask < 0) | (mask > VOID)]
        if bad.size:
            raise FscsError(
                f"{path}: mask value {int(bad[0])} is not a class id (0 background, 1..254, 255 void; "
                f"{bad.size} such pixels)"
            )
        mask = mask.astype(np.uint8)
    return mask


def has_mask(mask_path: Any) -> bool:
    """Whether an index row's ``mask_path`` names a mask (the index stores None, pandas may give NaN)."""
    return isinstance(mask_path, str) and bool(mask_path)


def gt_mask(index: pd.DataFrame, image_id: str, why: str = "") -> np.ndarray:
    """The ground-truth mask of an indexed image, checked against the index's size; ``why`` ends the
    "has no mask_path" error (what needed the mask)."""
    try:
        row = index.loc[image_id]
    except KeyError:
        raise FscsError(f"image index: image id {image_id!r} not found") from None
    path = row["mask_path"]
    if not has_mask(path):
        raise FscsError(f"image index: image {image_id!r} has no mask_path{why}")
    mask = load_mask(path)
    if mask.shape != (int(row["height"]), int(row["width"])):
        raise FscsError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but the index says "
            f"{int(row['width'])}x{int(row['height'])} for {image_id!r}"
        )
    return mask
