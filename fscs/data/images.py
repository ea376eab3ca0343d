"""Decoding images and index masks, with errors that name the file."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from fscs.errors import FscsError

VOID = 255


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as an RGB uint8 array (H, W, 3)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as exc:
        raise FscsError(f"{path}: image file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise FscsError(f"{path}: image does not decode ({exc})") from exc


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a class-index mask (palette or grey PNG) as uint8 (H, W); 0 background, 255 void."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise FscsError(f"{path}: mask must be a palette or greyscale index PNG, got mode {im.mode}")
            return np.asarray(im).astype(np.uint8)
    except FileNotFoundError as exc:
        raise FscsError(f"{path}: mask file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise FscsError(f"{path}: mask does not decode ({exc})") from exc
