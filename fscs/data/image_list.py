"""The (image_id, image_path) list of an image index, in index order: what extraction and its join read."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from fscs.core.errors import FscsError


def read_image_list(index: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(image_ids, image_paths) from the index parquet, in index order."""
    path = Path(index)
    if not path.is_file():
        raise FscsError(f"{path}: image index not found; run `dvc repro prepare`")
    try:
        df = pd.read_parquet(path, columns=["image_id", "image_path"])
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files / missing columns
        raise FscsError(f"{path}: cannot read image_id and image_path from the index ({exc})") from exc
    if df.empty:
        raise FscsError(f"{path}: the image index is empty")
    if df["image_id"].isna().any() or df["image_path"].isna().any():
        raise FscsError(f"{path}: null image_id or image_path in the index")
    ids = [str(i) for i in df["image_id"]]
    dup = pd.Series(ids)[pd.Series(ids).duplicated()]
    if len(dup):
        raise FscsError(f"{path}: duplicate image_id {dup.iloc[0]!r} in the index")
    return ids, [str(p) for p in df["image_path"]]
