"""Dataset readers: VOC, COCO instances JSON (polygon, RLE, crowd), COCO PNG masks, the min-area rule."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from fscs.core.errors import FscsError
from fscs.data.coco import COCO_CLASSES, render_semantic_mask
from fscs.data.index import INDEX_COLUMNS, build_index, read_index, write_index
from fscs.data.index_row import min_pixels
from fscs.data.voc import VOC_CLASSES, read_split_list


def dataset_params(root, **kw):
    d = {"name": "t", "root": str(root), "layout": "voc", "train_split": "train", "test_split": "val"}
    d["min_class_pixels"] = 0.01
    d.update(kw)
    return d


def test_voc_reader(voc_fixture):
    index, classes = build_index(voc_fixture.params["dataset"])
    assert classes == voc_fixture.classes
    assert list(index.columns) == list(INDEX_COLUMNS)
    assert len(index) == len(voc_fixture.labels) == 84
    assert list(index.index) == list(index["image_id"])
    for image_id, (split, labels) in voc_fixture.labels.items():
        row = index.loc[image_id]
        assert row["split"] == split
        assert row["classes"] == labels  # the 1-pixel class is below the 1% rule
        assert (row["height"], row["width"]) == (24, 32)
        assert os.path.isfile(row["image_path"]) and os.path.isfile(row["mask_path"])
    row = index.loc["train_1_1"]
    assert row["class_pixels"] == [16 * 23, 36]  # left half minus the void top row; the 6x6 square


def test_voc_index_roundtrip(voc_fixture, tmp_path):
    index, _ = build_index(voc_fixture.params["dataset"])
    write_index(index, tmp_path / "i.parquet")
    back = read_index(tmp_path / "i.parquet")
    assert back.loc["val_3_1", "classes"] == [3, 4]
    assert back.equals(index)


def test_voc_default_classes_and_paths(voc_fixture, monkeypatch):
    (voc_fixture.root / "classes.txt").unlink()
    (voc_fixture.root / "Annotations").mkdir()  # PASCAL VOC's own folder: the built-in names apply
    # only 6 of the 20 VOC ids are used by the fixture, so the built-in list reads it
    index, classes = build_index(dataset_params(voc_fixture.root))
    assert list(classes.values()) == list(VOC_CLASSES)
    # a relative root gives relative (normalised) paths
    monkeypatch.chdir(voc_fixture.root.parent)
    index, _ = build_index(dataset_params("./voc/"))
    assert index.loc["train_1_0", "image_path"] == os.path.join("voc", "JPEGImages", "train_1_0.jpg")


def test_split_list_formats(tmp_path):
    (tmp_path / "train_aug.txt").write_text(
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n\nb\n"
    )
    assert read_split_list(str(tmp_path), "train_aug") == ["2007_000032", "b"]


def test_min_area_rule():
    assert min_pixels(0.01, 10, 100) == 10  # fraction of 1000 pixels
    assert min_pixels(0.0, 10, 100) == 1
    assert min_pixels(50, 10, 100) == 50  # absolute count
    assert min_pixels(1, 10, 100) == 1
    with pytest.raises(FscsError, match="min_class_pixels"):
        min_pixels(-1, 3, 3)


def test_min_area_absolute(voc_fixture):
    d = dataset_params(voc_fixture.root, min_class_pixels=1)  # every class with >= 1 pixel
    index, _ = build_index(d)
    assert index.loc["train_1_0", "classes"] == [1, 3]
    assert index.loc["train_1_0", "class_pixels"] == [368, 1]
    index, _ = build_index(dataset_params(voc_fixture.root, min_class_pixels=37))  # the 36 px square drops
    assert index.loc["train_1_1", "classes"] == [1]


# --- bad input ---------------------------------------------------------------------------------------


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(FscsError, match="nowhere: dataset folder not found"):
        build_index(dataset_params(tmp_path / "nowhere"))


def test_missing_split_list(voc_fixture):
    (voc_fixture.root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(FscsError, match=r"val\.txt: split list for split 'val' not found"):
        build_index(voc_fixture.params["dataset"])


def test_image_does_not_decode(voc_fixture):
    (voc_fixture.root / "JPEGImages" / "val_2_3.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(FscsError, match=r"val_2_3\.jpg: image does not decode"):
        build_index(voc_fixture.params["dataset"])


def test_missing_image(voc_fixture):
    (voc_fixture.root / "JPEGImages" / "val_2_3.jpg").unlink()
    with pytest.raises(FscsError, match=r"val_2_3\.jpg: image file not found"):
        build_index(voc_fixture.params["dataset"])


def test_mask_size_differs(voc_fixture):
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(
        voc_fixture.root / "SegmentationClass" / "train_4_2.png"
    )
    with pytest.raises(
        FscsError, match=r"train_4_2\.png: mask is 10x10 .* but its image .*train_4_2\.jpg is 32x24"
    ):
        build_index(voc_fixture.params["dataset"])


def test_unknown_mask_value(voc_fixture):
    mask = np.zeros((24, 32), np.uint8)
    mask[3, 3] = 42
    Image.fromarray(mask, mode="L").save(voc_fixture.root / "SegmentationClass" / "train_4_2.png")
    with pytest.raises(FscsError, match=r"train_4_2\.png: mask values \[42\]"):
        build_index(voc_fixture.params["dataset"])


# --- COCO -----------------------------------------------------------------------------------------------


def _uncompressed_rle(m):
    flat = np.asarray(m, np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": list(m.shape)}


def make_coco_json(root, splits=("train2014", "val2014"), h=20, w=30):
    """Two images per split with non-contiguous category ids 1, 3, 7 -> classes 1, 2, 3."""
    cats = [{"id": 7, "name": "kite"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    (root / "annotations").mkdir(parents=True)
    for split in splits:
        (root / split).mkdir()
        images, anns = [], []
        for k in range(2):
            name = f"COCO_{split}_{10 + k:012d}.jpg"
            Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(root / split / name)
            images.append({"id": 10 + k, "file_name": name, "height": h, "width": w})
        # image 10: a polygon (car, big), an RLE square (kite) on top of it, a crowd person region
        anns.append(
            {
                "id": 1,
                "image_id": 10,
                "category_id": 3,
                "iscrowd": 0,
                "area": 200.0,
                "segmentation": [[0, 0, 20, 0, 20, 10, 0, 10]],
            }
        )
        kite = np.zeros((h, w), np.uint8, order="F")
        kite[2:6, 2:6] = 1
        rle = mask_utils.encode(np.asfortranarray(kite))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append(
            {"id": 2, "image_id": 10, "category_id": 7, "iscrowd": 0, "area": 16.0, "segmentation": rle}
        )
        crowd = np.zeros((h, w), np.uint8)
        crowd[5:20, 15:30] = 1
        anns.append(
            {
                "id": 3,
                "image_id": 10,
                "category_id": 1,
                "iscrowd": 1,
                "area": 225.0,
                "segmentation": _uncompressed_rle(crowd),
            }
        )
        # image 11: one person polygon
        anns.append(
            {
                "id": 4,
                "image_id": 11,
                "category_id": 1,
                "iscrowd": 0,
                "area": 100.0,
                "segmentation": [[10, 5, 20, 5, 20, 15, 10, 15]],
            }
        )
        doc = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def test_coco_json_reader(tmp_path):
    root = tmp_path / "coco"
    make_coco_json(root)
    cache = tmp_path / "cache"
    d = dataset_params(
        root, layout="coco_json", train_split="train2014", test_split="val2014", mask_cache=str(cache)
    )
    index, classes = build_index(d)
    assert classes == {1: "person", 2: "car", 3: "kite"}  # category-id order
    assert len(index) == 4
    row = index.loc["COCO_val2014_000000000010"]
    assert row["mask_path"] == str(cache / "val2014" / "COCO_val2014_000000000010.png")
    mask = np.asarray(Image.open(row["mask_path"]))
    assert mask[1, 10] == 2  # polygon car
    assert mask[3, 3] == 3  # RLE kite above the larger car
    assert mask[7, 17] == 2  # crowd under a non-crowd instance keeps the instance
    assert mask[15, 25] == 255  # crowd elsewhere is void
    assert mask[15, 5] == 0
    assert row["classes"] == [2, 3]  # the crowd-only person is not a label
    assert index.loc["COCO_train2014_000000000011", "classes"] == [1]
    # a second run reuses the cached masks and gives the same index
    again, _ = build_index(d)
    assert again.equals(index)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_render_polygon_matches_pycocotools():
    anns = [
        {"id": 1, "category_id": 5, "iscrowd": 0, "area": 10.0, "segmentation": [[1, 1, 8, 1, 8, 6, 1, 6]]}
    ]
    mask = render_semantic_mask(anns, 10, 12, {5: 4})
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[1, 1, 8, 1, 8, 6, 1, 6]], 10, 12)))
    assert np.array_equal(mask == 4, ref.astype(bool))
    assert set(np.unique(mask)) == {0, 4}


def test_coco_json_missing_file(tmp_path):
    root = tmp_path / "coco"
    make_coco_json(root, splits=("val2014",))
    d = dataset_params(
        root,
        layout="coco_json",
        train_split="train2014",
        test_split="val2014",
        mask_cache=str(tmp_path / "c"),
    )
    with pytest.raises(FscsError, match=r"instances_train2014\.json: COCO instances file not found"):
        build_index(d)


def test_coco_png_reader(tmp_path):
    root = tmp_path / "cocopng"
    for split in ("train2014", "val2014"):
        (root / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for k in range(3):
            stem = f"COCO_{split}_{k:012d}"
            Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(root / split / f"{stem}.jpg")
            mask = np.zeros((8, 10), np.uint8)
            mask[:4] = 80 - k
            mask[7, 9] = 1
            Image.fromarray(mask, mode="L").save(root / "annotations" / split / f"{stem}.png")
    d = dataset_params(
        root, layout="coco_png", train_split="train2014", test_split="val2014", min_class_pixels=2
    )
    index, classes = build_index(d)
    assert classes == {i + 1: n for i, n in enumerate(COCO_CLASSES)} and len(classes) == 80
    assert len(index) == 6
    assert index.loc["COCO_val2014_000000000001", "classes"] == [79]
    assert index.loc["COCO_val2014_000000000001", "class_pixels"] == [40]
    os.remove(root / "val2014" / "COCO_val2014_000000000002.jpg")
    with pytest.raises(FscsError, match=r"COCO_val2014_000000000002\.jpg: image file not found"):
        build_index(d)
