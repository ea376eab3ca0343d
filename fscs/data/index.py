"""The image index: one row per image with its split, file paths, size and image-level labels.

Columns (docs/ARCHITECTURE.md): `image_id` str, `split` str, `image_path` str, `mask_path` str (null if
none), `height` int, `width` int, `classes` list<int> (class ids passing the min-area rule, sorted),
`class_pixels` list<int> (their pixel counts). Written with pyarrow and an explicit schema, so the same
inputs give the same bytes.

Paths are stored as `dataset.root` joined with the file's place in the layout, normalised but not resolved:
relative to the project root (the working directory of every stage) when `dataset.root` is relative,
absolute when it is absolute. The index then does not depend on where the checkout lives.

One row per image is `fscs.data.index_row.record` (size, and labels under the min-area rule).
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from fscs.config.params import DatasetConfig, validate_section
from fscs.core.errors import FscsError
from fscs.core.io import atomic_path
from fscs.data import coco, voc
from fscs.data.index_row import record

INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("image_path", pa.string()),
        ("mask_path", pa.string()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("classes", pa.list_(pa.int64())),
        ("class_pixels", pa.list_(pa.int64())),
    ]
)
INDEX_COLUMNS = tuple(INDEX_SCHEMA.names)


def dataset_splits(dataset: DatasetConfig) -> list[str]:
    """The splits to index: train_split then test_split (once if they are the same)."""
    return list(dict.fromkeys([dataset.train_split, dataset.test_split]))


def build_index(dataset: dict[str, Any] | DatasetConfig) -> tuple[pd.DataFrame, dict[int, str]]:
    """Read the dataset described by params' `dataset` section: (index frame, {class id: name}).

    Keys (`fscs.config.params.DatasetConfig`): `name`, `root`, `layout` (voc | coco_json | coco_png),
    `train_split`, `test_split`, `min_class_pixels`; optional `mask_dir` (voc: default SegmentationClass,
    e.g. SegmentationClassAug; coco_png: default annotations), `split_dir` (voc: default
    ImageSets/Segmentation), `mask_cache` (coco_json: where rendered masks go, default
    data/raw/masks_rendered/<name>). Folder keys are relative to `root` unless absolute.
    """
    d = dataset if isinstance(dataset, DatasetConfig) else validate_section("dataset", dataset)
    layout, root, mcp = d.layout, os.path.normpath(d.root), d.min_class_pixels
    splits = dataset_splits(d)
    if layout == "voc":
        entries = voc.voc_entries(
            root,
            splits,
            mask_dir=d.mask_dir or voc.DEFAULT_MASK_DIR,
            split_dir=d.split_dir or voc.DEFAULT_SPLIT_DIR,
        )
        classes = voc.voc_class_list(root)
        rows = [
            record(image_id, split, image_path, mask_path, classes, mcp)
            for image_id, split, image_path, mask_path in tqdm(
                entries, desc="index", unit="img", disable=None, leave=False
            )
        ]
    elif layout == "coco_png":
        rows, classes = coco.coco_png_rows(root, splits, mcp, mask_dir=d.mask_dir or "annotations")
    elif layout == "coco_json":
        cache = d.mask_cache or os.path.join("data", "raw", "masks_rendered", d.name)
        rows, classes = coco.coco_json_rows(root, splits, mcp, cache_dir=cache)
    return rows_to_frame(rows), classes


def rows_to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Index rows (dicts) as a frame with the contract's columns; image ids must be unique."""
    seen: dict[str, str] = {}
    for row in rows:
        if row["image_id"] in seen:
            raise FscsError(
                f"image id {row['image_id']!r} appears twice (splits '{seen[row['image_id']]}' and "
                f"'{row['split']}'; {row['image_path']})"
            )
        seen[row["image_id"]] = row["split"]
    frame = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    return frame.set_index("image_id", drop=False).rename_axis(None)


def index_table(frame: pd.DataFrame) -> pa.Table:
    data = {name: list(frame[name]) for name in INDEX_COLUMNS}
    data["classes"] = [[int(c) for c in cs] for cs in data["classes"]]
    data["class_pixels"] = [[int(c) for c in cs] for cs in data["class_pixels"]]
    return pa.Table.from_pydict(data, schema=INDEX_SCHEMA)


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a table atomically with fixed settings (no pandas metadata, nothing time-dependent)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", store_schema=True)


def write_index(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    write_parquet(index_table(frame), path)


def read_index(path: str | os.PathLike) -> pd.DataFrame:
    """The image index as a DataFrame indexed by image_id (image_id also kept as a column).

    `classes` and `class_pixels` are python lists of int; `mask_path` is None where there is no mask.
    """
    if not os.path.isfile(path):
        raise FscsError(f"{path}: image index not found (run the prepare stage)")
    table = pq.read_table(path)
    missing = [c for c in INDEX_COLUMNS if c not in table.column_names]
    if missing:
        raise FscsError(f"{path}: not an image index (missing columns {missing})")
    data = {name: table.column(name).to_pylist() for name in INDEX_COLUMNS}
    frame = pd.DataFrame(data, columns=list(INDEX_COLUMNS))
    frame["height"] = frame["height"].astype("int64")
    frame["width"] = frame["width"].astype("int64")
    return frame.set_index("image_id", drop=False).rename_axis(None)
