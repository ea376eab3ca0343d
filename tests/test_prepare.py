"""The prepare stage: outputs per the contract, byte-identical reruns, bad input -> exit 2, no output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fscs.data.episodes import read_episodes
from fscs.data.folds import read_folds
from fscs.data.index import read_index
from stages import prepare
from stages._common import run_stage

REPO = Path(__file__).resolve().parents[1]


def write_params(tmp_path, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_prepare(tmp_path, params, out="out"):
    p = write_params(tmp_path, params)
    out = tmp_path / out
    argv = ["--params", str(p), "--index", str(out / "index.parquet"), "--episodes", str(out / "episodes")]
    run_stage(prepare.main, argv)
    return out


def outputs(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []


def test_prepare_outputs(voc_fixture, tmp_path, capsys):
    out = run_prepare(tmp_path, voc_fixture.params)
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "84 images" in summary[0] and "20 test + 5 val episodes" not in summary[0]
    assert "80 test + 20 val episodes per fold" in summary[0]
    assert outputs(out) == [
        "episodes/folds.json",
        "episodes/test.parquet",
        "episodes/val.parquet",
        "index.parquet",
    ]
    index = read_index(out / "index.parquet")
    assert len(index) == 84
    folds = read_folds(out / "episodes" / "folds.json")
    assert folds["folds"]["0"] == {"test": [1, 2, 3], "train": [4, 5, 6]}
    assert folds["train_split"] == "train" and folds["test_split"] == "val" and folds["too_few_images"] == []
    test = read_episodes(out / "episodes" / "test.parquet")
    val = read_episodes(out / "episodes" / "val.parquet")
    assert len(test) == 2 * 2 * 2 * 20 and len(val) == 2 * 2 * 2 * 5
    counts = test.groupby(["fold", "way", "shot"]).size()
    assert set(counts) == {20}
    assert all(index.loc[q, "split"] == "val" for q in test["query_id"])
    assert all(index.loc[q, "split"] == "train" for q in val["query_id"])


def test_prepare_byte_identical(voc_fixture, tmp_path):
    a = run_prepare(tmp_path, voc_fixture.params, "a")
    b = run_prepare(tmp_path, voc_fixture.params, "b")
    for name in outputs(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    params = json.loads(json.dumps(voc_fixture.params))
    params["episodes"]["seed"] = 1
    c = run_prepare(tmp_path, params, "c")
    assert (a / "episodes/test.parquet").read_bytes() != (c / "episodes/test.parquet").read_bytes()


def expect_error(tmp_path, params, capsys, *fragments):
    with pytest.raises(SystemExit) as info:
        run_prepare(tmp_path, params)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err, err
    assert outputs(tmp_path / "out") == []


def test_bad_missing_folder(voc_fixture, tmp_path, capsys):
    params = voc_fixture.params
    params["dataset"]["root"] = str(tmp_path / "missing")
    expect_error(tmp_path, params, capsys, "missing: dataset folder not found")


def test_bad_missing_split(voc_fixture, tmp_path, capsys):
    (voc_fixture.root / "ImageSets/Segmentation/train.txt").unlink()
    expect_error(tmp_path, voc_fixture.params, capsys, "train.txt: split list for split 'train' not found")


def test_bad_image(voc_fixture, tmp_path, capsys):
    (voc_fixture.root / "JPEGImages/val_6_6.jpg").write_bytes(b"\xff\xd8garbage")
    expect_error(tmp_path, voc_fixture.params, capsys, "val_6_6.jpg: image does not decode")


def test_bad_mask_size(voc_fixture, tmp_path, capsys):
    Image.fromarray(np.zeros((24, 31), np.uint8), mode="L").save(
        voc_fixture.root / "SegmentationClass/val_6_6.png"
    )
    expect_error(tmp_path, voc_fixture.params, capsys, "val_6_6.png: mask is 31x24", "is 32x24")


def test_bad_excluded_class(voc_fixture, tmp_path, capsys):
    voc_fixture.params["dataset"]["exclude_classes"] = ["horse"]
    expect_error(tmp_path, voc_fixture.params, capsys, "'horse'", "not in the dataset's class list")


def test_bad_too_few_images(voc_fixture, tmp_path, capsys):
    voc_fixture.params["episodes"]["shots"] = [1, 10]
    expect_error(
        tmp_path, voc_fixture.params, capsys, "class 1 (cat) has 10 image(s) in split 'val'", "10-shot"
    )


def test_too_few_images_drop(voc_fixture, tmp_path, capsys):
    lst = voc_fixture.root / "ImageSets/Segmentation/val.txt"
    lst.write_text(
        "".join(f"{i}\n" for i in lst.read_text().split() if i not in {f"val_1_{k}" for k in range(5)})
    )
    voc_fixture.params["episodes"]["too_few_images"] = "drop"
    out = run_prepare(tmp_path, voc_fixture.params)
    assert "warning: class 1 (cat) has 5 image(s) in split 'val'" in capsys.readouterr().err
    dropped = read_folds(out / "episodes/folds.json")["too_few_images"]
    assert dropped == [
        {"episodes": "test", "fold": 0, "shot": 5, "class": 1, "name": "cat", "split": "val", "images": 5}
    ]
    test = read_episodes(out / "episodes/test.parquet")
    five = test[(test["fold"] == 0) & (test["shot"] == 5)]
    assert len(five) == 40 and not any(1 in cs for cs in five["support_classes"])


@pytest.mark.slow
def test_prepare_real_msrc(tmp_path, monkeypatch, capsys):
    root = REPO.parent / "shared" / "data" / "msrc-v2"
    if not root.is_dir():
        pytest.skip(f"{root} not available")
    monkeypatch.chdir(REPO)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"]["root"] = os.path.relpath(root, REPO)
    out = run_prepare(tmp_path, params)
    assert "591 images" in capsys.readouterr().out
    index = read_index(out / "index.parquet")
    assert len(index) == 591 and (index["split"] == "train").sum() == 355
    assert os.path.isfile(index.iloc[0]["image_path"])
    folds = read_folds(out / "episodes/folds.json")
    assert len(folds["included"]) == 21 and len(folds["folds"]) == 4
    assert [len(folds["folds"][str(f)]["test"]) for f in range(4)] == [6, 5, 5, 5]
    test = read_episodes(out / "episodes/test.parquet")
    n = params["episodes"]["test_per_fold"]
    assert len(test) == 4 * len(params["episodes"]["ways"]) * len(params["episodes"]["shots"]) * n
