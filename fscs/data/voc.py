"""The VOC layout: JPEGImages/, an index-PNG mask folder, ImageSets/Segmentation/<split>.txt, a class list.

Reads PASCAL VOC 2012 (mask folder `SegmentationClass`, or the SBD-augmented `SegmentationClassAug` with
the `train_aug` list for Pascal-5i) and MSRC-v2 (which ships a `classes.txt`). Mask pixel values are
class ids; 0 = background, 255 = void.
"""

from __future__ import annotations

import os
from pathlib import Path

from fscs.core.errors import FscsError

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

IMAGE_DIR = "JPEGImages"
DEFAULT_MASK_DIR = "SegmentationClass"
DEFAULT_SPLIT_DIR = "ImageSets/Segmentation"


def sub_path(root: str, rel: str) -> str:
    """`rel` under `root` (or `rel` itself when absolute), normalised but not resolved."""
    return os.path.normpath(os.path.join(root, rel))


def read_class_file(path: str | os.PathLike) -> dict[int, str]:
    """Parse a class list: one `index<TAB>name` (or `index name`) a line; ids must be 1..254 and unique."""
    classes: dict[int, str] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split(None, 1)
        if len(parts) != 2 or not parts[0].strip().isdigit() or not parts[1].strip():
            raise FscsError(f"{path}:{lineno}: expected 'index<TAB>name', got {line!r}")
        cid, name = int(parts[0]), parts[1].strip()
        if not 1 <= cid <= 254:
            raise FscsError(f"{path}:{lineno}: class index {cid} outside 1..254 (0 = background, 255 = void)")
        if cid in classes:
            raise FscsError(f"{path}:{lineno}: class index {cid} listed twice")
        if name in classes.values():
            raise FscsError(f"{path}:{lineno}: class name {name!r} listed twice")
        classes[cid] = name
    if not classes:
        raise FscsError(f"{path}: empty class list")
    return dict(sorted(classes.items()))


def read_class_list(root: str, default: tuple[str, ...] = VOC_CLASSES) -> dict[int, str]:
    """The dataset's classes: `root/classes.txt` if present, else `default` numbered 1..n."""
    path = os.path.join(root, "classes.txt")
    if os.path.isfile(path):
        return read_class_file(path)
    return {i + 1: name for i, name in enumerate(default)}


#: A folder PASCAL VOC ships (XML box annotations) and a converted dataset such as MSRC does not.
VOC_MARKER = "Annotations"


def voc_class_list(root: str) -> dict[int, str]:
    """The classes of a VOC-layout folder: its `classes.txt`; without one, the 20 VOC names, but only for
    PASCAL VOC itself, recognised by its `Annotations/` folder (mask ids of another dataset would otherwise
    be read silently under VOC's names)."""
    if os.path.isfile(os.path.join(root, "classes.txt")) or os.path.isdir(os.path.join(root, VOC_MARKER)):
        return read_class_list(root)
    raise FscsError(
        f"{os.path.join(root, 'classes.txt')}: not found; a VOC-layout dataset names its classes there (one "
        f"'id<TAB>name' a line); only PASCAL VOC itself (recognised by its {VOC_MARKER}/ folder) may omit it"
    )


def read_split_list(split_dir: str, split: str) -> list[str]:
    """Image ids of a split list `<split_dir>/<split>.txt`, in file order.

    A line's first token is the id; lines like `/JPEGImages/x.jpg /SegmentationClassAug/x.png` (DeepLab's
    train_aug list) give the stem of the first path. An id listed twice is an error.
    """
    path = os.path.join(split_dir, f"{split}.txt")
    if not os.path.isfile(path):
        raise FscsError(f"{path}: split list for split '{split}' not found")
    ids: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        image_id = Path(tokens[0]).stem if "/" in tokens[0] or "." in tokens[0] else tokens[0]
        if image_id in seen:
            raise FscsError(f"{path}:{lineno}: image id {image_id!r} listed twice")
        seen.add(image_id)
        ids.append(image_id)
    if not ids:
        raise FscsError(f"{path}: split list '{split}' is empty")
    return ids


def voc_entries(
    root: str,
    splits: list[str],
    mask_dir: str = DEFAULT_MASK_DIR,
    split_dir: str = DEFAULT_SPLIT_DIR,
) -> list[tuple[str, str, str, str]]:
    """(image_id, split, image_path, mask_path) for every listed image, after checking the layout.

    Paths are `root` joined with the relative parts (normalised, not resolved): relative when `root` is.
    """
    if not os.path.isdir(root):
        raise FscsError(f"{root}: dataset folder not found")
    image_root = sub_path(root, IMAGE_DIR)
    mask_root = sub_path(root, mask_dir)
    for folder, what in ((image_root, "image"), (mask_root, "mask")):
        if not os.path.isdir(folder):
            raise FscsError(f"{folder}: {what} folder not found")
    lists = {split: read_split_list(sub_path(root, split_dir), split) for split in splits}
    entries = []
    for split, ids in lists.items():
        for image_id in ids:
            entries.append(
                (
                    image_id,
                    split,
                    os.path.join(image_root, f"{image_id}.jpg"),
                    os.path.join(mask_root, f"{image_id}.png"),
                )
            )
    return entries
