"""Stage get_data: a local copy is linked, else the official MSRC-v2 zip is downloaded (from a 127.0.0.1
server here), checked and converted to the VOC layout; with neither it stops with one line."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fscs.data import get, msrc
from fscs.data.voc import read_class_file
from stages import get_data
from stages._common import run_stage
from tests.conftest import build_voc
from tests.test_data_get import server  # noqa: F401  (fixture: a static file server on 127.0.0.1)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc-v2"
ARCHIVE = "msrc_objcategimagedatabase_v2.zip"


def _bmp(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="BMP")
    return buf.getvalue()


def official_zip(path: Path) -> str:
    """A tiny archive laid out like Microsoft's: 1_1_s (train) and 1_3_s (val); returns its md5."""
    gt = np.zeros((4, 6, 3), dtype=np.uint8)  # black = void
    gt[:, :3] = (128, 0, 0)  # building
    gt[:2, 3:] = (128, 128, 128)  # sky
    gt[3, 5] = (1, 2, 3)  # a colour no class has: void
    with zipfile.ZipFile(path, "w") as z:
        for image_id in ("1_1_s", "1_3_s"):
            image = np.full((4, 6, 3), 90, dtype=np.uint8)
            z.writestr(f"MSRC_ObjCategImageDatabase_v2/Images/{image_id}.bmp", _bmp(image))
            z.writestr(f"MSRC_ObjCategImageDatabase_v2/GroundTruth/{image_id}_GT.bmp", _bmp(gt))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def no_local_copy(tmp_path, monkeypatch):
    """Run from a folder with no shared/ above it and no FSCS_MSRC_SOURCE."""
    monkeypatch.delenv("FSCS_MSRC_SOURCE", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def with_md5(monkeypatch, md5: str) -> None:
    source = get.DATASETS["msrc"]
    files = tuple(dataclasses.replace(f, md5=md5) for f in source.files)
    monkeypatch.setitem(get.DATASETS, "msrc", dataclasses.replace(source, files=files))


def test_downloads_and_converts_the_official_archive(server, no_local_copy, monkeypatch):  # noqa: F811
    served, url = server
    with_md5(monkeypatch, official_zip(served / ARCHIVE))
    monkeypatch.setenv("FSCS_MIRROR", url)
    get_data.main(["--dest", "data/raw/msrc"])
    dest = no_local_copy / "data" / "raw" / "msrc"
    assert not dest.is_symlink()
    assert sorted(os.listdir(dest / "JPEGImages")) == ["1_1_s.jpg", "1_3_s.jpg"]
    lists = dest / "ImageSets" / "Segmentation"
    assert (lists / "train.txt").read_text() == "1_1_s\n" and (lists / "val.txt").read_text() == "1_3_s\n"
    mask = np.asarray(Image.open(dest / "SegmentationClass" / "1_1_s.png"))
    assert mask[0, 0] == 1 and mask[0, 5] == 7  # building, sky
    assert mask[2, 4] == msrc.VOID and mask[3, 5] == msrc.VOID  # black and unknown colours
    assert read_class_file(dest / "classes.txt")[23] == "boat"
    get_data.main(["--dest", "data/raw/msrc"])  # present: nothing to do, nothing downloaded again


def test_links_the_copy_named_by_the_environment(tmp_path, no_local_copy, monkeypatch):
    build_voc(tmp_path / "copy")
    monkeypatch.setenv("FSCS_MSRC_SOURCE", str(tmp_path / "copy"))
    get_data.main(["--dest", "data/raw/msrc"])
    assert os.readlink(tmp_path / "data" / "raw" / "msrc") == str(tmp_path / "copy")


def test_finds_shared_from_a_dvc_experiment_copy(tmp_path, monkeypatch):
    """Queued experiments run in <repo>/.dvc/tmp/exps/<name>: ../shared of the repo is still found."""
    monkeypatch.delenv("FSCS_MSRC_SOURCE", raising=False)
    build_voc(tmp_path / "shared" / "data" / "msrc-v2")
    workspace = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    get_data.main(["--dest", "data/raw/msrc"])
    assert os.readlink(workspace / "data" / "raw" / "msrc") == str(tmp_path / "shared" / "data" / "msrc-v2")


def test_no_copy_and_no_network_stops_with_one_line(no_local_copy, monkeypatch, capsys):
    monkeypatch.setenv("FSCS_MIRROR", "http://127.0.0.1:9/")  # the discard port: connection refused
    with pytest.raises(SystemExit) as exc:
        run_stage(get_data.main, ["--dest", "data/raw/msrc"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no local copy of msrc and no download")
    assert "FSCS_MSRC_SOURCE=DIR" in err
    assert not (no_local_copy / "data" / "raw" / "msrc").exists()


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/msrc-v2")
def test_conversion_matches_the_prepared_copy():
    """The converted download has the prepared copy's classes and train/val split."""
    assert read_class_file(SHARED / "classes.txt") == {i: name for i, (name, _) in msrc.CLASSES.items()}
    for split in ("train", "val"):
        ids = (SHARED / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert {msrc.split_of(i) for i in ids} == {split}
