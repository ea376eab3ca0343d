"""The HDF5 feature store: exact round trip, refusal of mismatched or incomplete stores, resume/rebuild."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from fscs.config.params import validate, validate_section
from fscs.core.errors import FscsError
from fscs.features.store import (
    NORMALIZATION,
    STORE_VERSION,
    FeatureStore,
    StoreWriter,
    check_attrs,
    expected_attrs,
    iter_batches,
    partial_path,
    resolve_layers,
)

L, P, D, H = 3, 4, 8, 2
SHAPES = {"tokens": (L, 1 + P, D), "cls_query": (H, D // H), "patch_keys": (H, P, D // H)}


def attrs(**over):
    a = {
        "backbone": "vit_tiny_random",
        "arch": "vit_tiny_random",
        "weights_sha256": "ab" * 32,
        "source": "test",
        "input_size": 16,
        "patch_size": 8,
        "grid": [2, 2],
        "layers": [0, 1, 2],
        "depth": 3,
        "num_heads": H,
        "embed_dim": D,
        "normalization": NORMALIZATION,
        "code_version": STORE_VERSION,
    }
    a.update(over)
    return a


def rows_data(ids, seed=0):
    rng = np.random.default_rng(seed)
    n = len(ids)
    return (
        rng.normal(size=(n, *SHAPES["tokens"])).astype(np.float32),
        rng.normal(size=(n, *SHAPES["cls_query"])).astype(np.float32),
        rng.normal(size=(n, *SHAPES["patch_keys"])).astype(np.float32),
    )


def write_store(path, ids, a=None, finalize=True, upto=None):
    tok, q, k = rows_data(ids)
    w = StoreWriter(path, ids, a or attrs(), SHAPES)
    for rows in iter_batches(len(ids) if upto is None else upto, 2):
        w.write(rows, tok[rows], q[rows], k[rows])
    if finalize:
        w.finalize()
    w.close()
    return tok, q, k


def test_round_trip_exact_float16(tmp_path):
    ids = ["a", "b", "c", "d", "e"]
    path = tmp_path / "f.h5"
    tok, q, k = write_store(path, ids)
    assert path.exists() and not partial_path(path).exists()
    expect = {"backbone": "vit_tiny_random", "input_size": 16, "layers": "all", "code_version": STORE_VERSION}
    with FeatureStore(path, expect) as fs:
        assert fs.image_ids == ids and len(fs) == 5 and "c" in fs
        assert fs.grid == (2, 2) and fs.num_heads == H and fs.embed_dim == D and fs.layers == [0, 1, 2]
        for r, iid in enumerate(ids):
            t = fs.tokens(iid)
            assert t.dtype == np.float16 and t.shape == SHAPES["tokens"]
            np.testing.assert_array_equal(t, tok[r].astype(np.float16))
            np.testing.assert_array_equal(fs.cls_query(iid), q[r].astype(np.float16))
            np.testing.assert_array_equal(fs.patch_keys(iid), k[r].astype(np.float16))
            np.testing.assert_array_equal(fs.cls_tokens(iid), tok[r, :, 0].astype(np.float16))
        assert fs.read_all("cls_query").shape == (5, *SHAPES["cls_query"])
        with pytest.raises(FscsError, match="'zz' is not in the feature store"):
            fs.tokens("zz")
    with h5py.File(path) as f:  # one image per chunk
        assert f["tokens"].chunks == (1, *SHAPES["tokens"])
        assert f["tokens"].dtype == np.float16 and bool(f.attrs["complete"])


def test_refuses_mismatched_params_naming_the_attribute(tmp_path):
    path = tmp_path / "f.h5"
    write_store(path, ["a", "b"])
    with pytest.raises(
        FscsError, match=r"attribute 'input_size' is 16 in the store but the params ask for 448"
    ):
        FeatureStore(path, {"backbone": "vit_tiny_random", "input_size": 448})
    with pytest.raises(FscsError, match=r"'backbone' is 'vit_tiny_random' .* 'dino_vits8'"):
        FeatureStore(path, {"backbone": "dino_vits8"})
    with pytest.raises(FscsError, match=r"'layers' is \[0, 1, 2\] .* \[0, 2\]"):
        FeatureStore(path, {"layers": [0, 2]})
    with pytest.raises(FscsError, match=r"'code_version'"):
        FeatureStore(path, {"code_version": STORE_VERSION + 1})
    FeatureStore(path, {"layers": [-1, 0, 1]}).close()  # same blocks, other spelling


def test_incomplete_store_refused(tmp_path):
    path = tmp_path / "f.h5"
    write_store(path, ["a", "b", "c", "d"], finalize=False, upto=2)
    assert not path.exists() and partial_path(path).exists()
    with pytest.raises(
        FscsError, match=r"not found \(an unfinished f.h5.partial exists\).*dvc repro extract"
    ):
        FeatureStore(path)
    partial_path(path).rename(path)  # someone renamed it by hand: still refused
    with pytest.raises(FscsError, match=r"incomplete; re-run `dvc repro extract`"):
        FeatureStore(path)
    path.write_bytes(b"not hdf5")
    with pytest.raises(FscsError, match="not a readable HDF5"):
        FeatureStore(path)


def test_finalize_requires_every_row(tmp_path):
    w = StoreWriter(tmp_path / "f.h5", ["a", "b"], attrs(), SHAPES)
    tok, q, k = rows_data(["a"])
    w.write([0], tok, q, k)
    with pytest.raises(FscsError, match="1 rows not written"):
        w.finalize()
    w.close()


def test_resume_matching_partial_and_rebuild_otherwise(tmp_path):
    ids = ["a", "b", "c", "d", "e"]
    path = tmp_path / "f.h5"
    tok, q, k = write_store(path, ids, finalize=False, upto=4)
    # same attrs and ids: resumed, rows 0-3 kept
    w = StoreWriter(path, ids, attrs(), SHAPES)
    assert w.resumed and w.done.tolist() == [True] * 4 + [False]
    w.write([4], tok[4:], q[4:], k[4:])
    w.finalize()
    with FeatureStore(path) as fs:
        np.testing.assert_array_equal(fs.tokens("b"), tok[1].astype(np.float16))
        np.testing.assert_array_equal(fs.tokens("e"), tok[4].astype(np.float16))
    # other attrs or other image list: rebuilt from scratch
    write_store(path, ids, finalize=False, upto=4)
    w = StoreWriter(path, ids, attrs(input_size=24), SHAPES)
    assert not w.resumed and not w.done.any()
    w.close()
    write_store(path, ids, finalize=False, upto=4)
    w = StoreWriter(path, ["a", "b", "c", "d", "x"], attrs(), SHAPES)
    assert not w.resumed and not w.done.any()
    w.close()
    # a partial that does not open (killed mid-write beyond repair): rebuilt
    partial_path(path).write_bytes(b"\x89HDF\r\n garbage")
    w = StoreWriter(path, ids, attrs(), SHAPES)
    assert not w.resumed and not w.done.any()
    w.close()


def test_duplicate_ids_refused(tmp_path):
    with pytest.raises(FscsError, match="duplicate image ids"):
        StoreWriter(tmp_path / "f.h5", ["a", "a"], attrs(), SHAPES)


def test_resolve_layers_and_check_attrs():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers([-1, 0], 4) == [0, 3]
    with pytest.raises(FscsError, match="not a block index"):
        resolve_layers([4], 4)
    with pytest.raises(FscsError, match="'all' or a non-empty list"):
        resolve_layers("some", 4)
    with pytest.raises(FscsError, match="attribute 'arch' is missing"):
        check_attrs({"backbone": "x"}, {"arch": "y"}, "s.h5")


def test_expected_attrs_from_params():
    params = {
        "backbone": {"name": "dinov2_vits14_imgfocus", "input_size": 224, "layers": "all", "batch_size": 8}
    }
    e = expected_attrs(validate(params).backbone)
    assert e == {
        "backbone": "dinov2_vits14_imgfocus",
        "arch": "vit_small_patch14_dinov2",
        "input_size": 224,
        "layers": "all",
        "normalization": NORMALIZATION,
        "code_version": STORE_VERSION,
        "precision": "fp32",
        "storage": "fp16",
    }
    assert (
        expected_attrs(validate_section("backbone", {"name": "path:/x.pt", "arch": "vit_small_patch16_224"}))[
            "arch"
        ]
        == "vit_small_patch16_224"
    )
    assert (
        expected_attrs(validate_section("backbone", {"name": "path:/x.pt"}))["arch"] == "vit_small_patch8_224"
    )
    with pytest.raises(FscsError, match="unknown backbone 'nope'"):
        expected_attrs(validate_section("backbone", {"name": "nope"}))
