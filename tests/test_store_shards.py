"""Sharded extraction: N shards joined give the store one shard gives, row for row; a joined store with a
missing, truncated, incomplete or swapped shard is refused naming the shard file; bad shard ids too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from fscs.config.params import validate_section
from fscs.core.errors import FscsError
from fscs.features.shards import shard_file, shard_rows
from fscs.features.store import DATASETS, SHARD_ATTRS, FeatureStore, expected_attrs
from stages import extract, extract_shard

ROOT = Path(__file__).resolve().parents[1]
MSRC = ROOT.parent / "shared" / "data" / "msrc-v2" / "JPEGImages"


def expect(params: dict) -> dict:
    """The store attributes params.yaml's ``backbone`` section expects."""
    return expected_attrs(validate_section("backbone", params["backbone"]))


@pytest.fixture(scope="module")
def msrc_index(tmp_path_factory) -> Path:
    """An index of six MSRC images (or six random ones where MSRC is not at hand)."""
    tmp = tmp_path_factory.mktemp("index")
    files = sorted(MSRC.glob("*.jpg"))[:6]
    if len(files) < 6:
        from PIL import Image

        rng = np.random.default_rng(0)
        files = [tmp / f"im{i}.jpg" for i in range(6)]
        for i, f in enumerate(files):
            Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(f)
    index = tmp / "index.parquet"
    pd.DataFrame({"image_id": [f.stem for f in files], "image_path": [str(f) for f in files]}).to_parquet(
        index
    )
    return index


def params_file(folder: Path, shards: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    backbone = {"name": "vit_tiny_random", "input_size": 32, "batch_size": 2, "threads": 1, "shards": shards}
    path.write_text(yaml.safe_dump({"backbone": backbone}))
    return path


def sharded(folder: Path, index: Path, n: int) -> Path:
    """Run the extract_shard@I stages and the join as dvc.yaml does, in ``folder``; the joined store."""
    params = params_file(folder, list(range(n)))
    for i in range(n):
        extract_shard.main(
            ["--shard", str(i), "--index", str(index), "--params", str(params),
             "--out", str(shard_file(folder / "shards", i)),
             "--report", str(folder / "reports" / f"shard-{i}.json")]
        )  # fmt: skip
    out = folder / "features.h5"
    extract.main(
        ["--index", str(index), "--params", str(params), "--shards", str(folder / "shards"),
         "--shard-reports", str(folder / "reports"), "--out", str(out),
         "--report", str(folder / "extract.json")]
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory, msrc_index) -> dict:
    """The single-file store of today's extract (no --shard) and joined stores of 1 and 2 shards."""
    tmp = tmp_path_factory.mktemp("stores")
    single = tmp / "single.h5"
    params = params_file(tmp, [0])
    extract_shard.main(
        ["--index", str(msrc_index), "--params", str(params), "--out", str(single),
         "--report", str(tmp / "r.json")]
    )  # fmt: skip
    one = sharded(tmp / "one", msrc_index, 1)
    two = sharded(tmp / "two", msrc_index, 2)
    return {"single": single, "one": one, "two": two, "params": yaml.safe_load(params.read_text())}


def contents(path: Path) -> tuple[dict, dict]:
    """(attributes without the shard record, every dataset read through FeatureStore)."""
    with FeatureStore(path) as fs:
        attrs = {k: v for k, v in fs.attrs.items() if k not in SHARD_ATTRS}
        return attrs, {name: fs.read_all(name) for name in DATASETS}


def copy_joined(stores: dict, tmp_path: Path) -> Path:
    """A copy of the two-shard store's folder (joined file and shards), to damage."""
    folder = tmp_path / "two"
    shutil.copytree(stores["two"].parent, folder)
    return folder / "features.h5"


def test_shard_rows_are_contiguous_and_cover_the_index():
    assert [list(shard_rows(7, 3, i)) for i in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
    assert list(shard_rows(5, 1, 0)) == [0, 1, 2, 3, 4]
    with pytest.raises(FscsError, match="3 shards for 2 images"):
        shard_rows(2, 3, 0)
    with pytest.raises(FscsError, match="--shard 2: not one of backbone.shards 0..1"):
        shard_rows(4, 2, 2)


def test_two_shards_equal_one_shard_row_for_row(stores):
    single_attrs, single = contents(stores["single"])
    for name in ("one", "two"):
        attrs, data = contents(stores[name])
        assert attrs == single_attrs, name
        for dataset in DATASETS:
            np.testing.assert_array_equal(data[dataset], single[dataset], err_msg=f"{name}: {dataset}")
    with FeatureStore(stores["two"], expect(stores["params"])) as fs:
        assert fs.attrs["shard_rows"] == [3, 3] and fs.attrs["shard_files"] == [
            "shards/shard-0.h5",
            "shards/shard-1.h5",
        ]
        assert fs.tokens(fs.image_ids[4]).shape == (3, 17, 48)
    with h5py.File(stores["two"]) as f:
        assert all(f[d].is_virtual for d in DATASETS if d != "image_ids")
    report = json.loads((stores["two"].parent / "extract.json").read_text())
    assert report["images"] == 6 and report["shards"] == 2 and report["computed"] == 6


def test_joined_store_reads_from_any_cwd_and_after_a_move(stores, tmp_path, monkeypatch):
    """Source names are relative to the joined file's folder: any cwd reads it, and a moved folder."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(stores["two"].parent, moved)
    _, want = contents(stores["two"])
    monkeypatch.chdir(tmp_path)
    for path in (moved / "features.h5", Path("elsewhere/features.h5")):
        np.testing.assert_array_equal(contents(path)[1]["tokens"], want["tokens"])
    monkeypatch.setenv("HDF5_VDS_PREFIX", str(tmp_path))
    with pytest.raises(FscsError, match="HDF5_VDS_PREFIX is set"):
        FeatureStore(moved / "features.h5")


def test_missing_shard_refused(stores, tmp_path):
    joined = copy_joined(stores, tmp_path)
    gone = joined.parent / "shards" / "shard-1.h5"
    gone.unlink()
    with h5py.File(joined) as f:  # what the check guards against: HDF5 reads fill values, no error
        assert not f["tokens"][5].any()
    with pytest.raises(FscsError, match=f"{gone}: shard file is missing; re-run `dvc repro extract`"):
        FeatureStore(joined)


def test_truncated_shard_refused(stores, tmp_path):
    joined = copy_joined(stores, tmp_path)
    shard = joined.parent / "shards" / "shard-0.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(FscsError, match=f"{shard}: shard is not a readable HDF5 file"):
        FeatureStore(joined)


def test_incomplete_shard_refused(stores, tmp_path):
    joined = copy_joined(stores, tmp_path)
    shard = joined.parent / "shards" / "shard-1.h5"
    with h5py.File(shard, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(FscsError, match=f"{shard}: shard is incomplete"):
        FeatureStore(joined)


def test_swapped_shard_refused(stores, tmp_path):
    """A shard file from another split of the index (other rows, other images) is not the one joined."""
    joined = copy_joined(stores, tmp_path)
    shard = joined.parent / "shards" / "shard-1.h5"
    shutil.copy(stores["one"].parent / "shards" / "shard-0.h5", shard)  # all six rows instead of three
    with pytest.raises(FscsError, match=f"{shard}: shard holds .* rows, the join recorded 3"):
        FeatureStore(joined)


def test_join_refuses_shards_that_do_not_split_the_index(stores, tmp_path, msrc_index):
    folder = tmp_path / "j"
    shutil.copytree(stores["two"].parent / "shards", folder / "shards")
    shutil.copytree(stores["two"].parent / "reports", folder / "reports")
    (folder / "shards" / "shard-0.h5").rename(folder / "shards" / "x.h5")
    (folder / "shards" / "shard-1.h5").rename(folder / "shards" / "shard-0.h5")
    (folder / "shards" / "x.h5").rename(folder / "shards" / "shard-1.h5")
    with pytest.raises(FscsError, match="shard-0.h5: shard 0 of 2 holds other images than rows 0..2"):
        extract.main(
            ["--index", str(msrc_index), "--params", str(params_file(folder, [0, 1])),
             "--shards", str(folder / "shards"), "--shard-reports", str(folder / "reports"),
             "--out", str(folder / "f.h5"), "--report", str(folder / "r.json")]
        )  # fmt: skip
    assert not (folder / "f.h5").exists()


@pytest.mark.parametrize(
    "shards", [[1], [0, 2], [0, 0]]
)  # [] is online features: tests/test_online_features.py
def test_invalid_shard_ids_refused(tmp_path, msrc_index, shards):
    params = params_file(tmp_path, shards)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.extract_shard", "--shard", "0", "--index", str(msrc_index), "--params",
         str(params), "--out", str(tmp_path / "s.h5"), "--report", str(tmp_path / "r.json")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: params: backbone.shards = {shards!r}: expected"), proc.stderr
    assert not list(tmp_path.glob("s.h5*"))


def test_damaged_shard_row_named_through_the_joined_store(stores, tmp_path):
    """Fletcher32 still guards each row: a damaged chunk in a shard fails its read through the join."""
    joined = copy_joined(stores, tmp_path)
    shard = joined.parent / "shards" / "shard-1.h5"
    with h5py.File(shard) as f:
        info = f["tokens"].id.get_chunk_info_by_coord((1, 0, 0, 0))  # joined row 4
    data = bytearray(shard.read_bytes())
    data[info.byte_offset + info.size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with FeatureStore(joined) as fs, pytest.raises(FscsError) as exc:
        fs.tokens(fs.image_ids[4])
    assert f"{joined}: dataset 'tokens' is damaged: rows 4 (" in str(exc.value)
