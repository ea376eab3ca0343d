"""`backbone.storage` in the feature store: bf16 and int8 round trips within their rounding, fp16 stores as
before, CRC-32 over codes and scales, refusal of another storage type, shard joins and bytes per image."""

from __future__ import annotations

import zlib

import h5py
import numpy as np
import pytest

from fscs.config.params import validate_section
from fscs.core.errors import FscsError
from fscs.features.shards import join_shards
from fscs.features.store import (
    DATASETS,
    DIGESTED,
    NORMALIZATION,
    SCALES,
    STORE_VERSION,
    FeatureStore,
    StoreWriter,
    expected_attrs,
    iter_batches,
    row_bytes,
)

L, P, D, H = 3, 4, 8, 2
SHAPES = {"tokens": (L, 1 + P, D), "cls_query": (H, D // H), "patch_keys": (H, P, D // H)}
IDS = ["a", "b", "c", "d", "e", "f"]
CODES = {"fp16": np.float16, "bf16": np.uint16, "int8": np.int8}


def attrs() -> dict:
    return {
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
        "precision": "fp32",
    }


def rows_data(ids, shapes=SHAPES, seed=0) -> dict[str, np.ndarray]:
    """float32 rows with a spread of magnitudes (one large dimension per vector, as ViT tokens have)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in DIGESTED:
        x = rng.normal(size=(len(ids), *shapes[name])).astype(np.float32)
        x[..., 0] *= 20.0
        out[name] = x
    return out


def write_store(path, storage, ids=IDS, shapes=SHAPES, upto=None, finalize=True, **kw) -> dict:
    data = rows_data(ids, shapes)
    w = StoreWriter(path, ids, attrs(), shapes, **({"storage": storage} if storage else {}), **kw)
    for rows in iter_batches(len(ids) if upto is None else upto, 4):
        w.write(rows, *(data[name][rows] for name in DIGESTED))
    if finalize:
        w.finalize()
    w.close()
    return data


def read(fs: FeatureStore, image_id: str) -> dict[str, np.ndarray]:
    return {
        "tokens": fs.tokens(image_id),
        "cls_query": fs.cls_query(image_id),
        "patch_keys": fs.patch_keys(image_id),
    }


@pytest.mark.parametrize("storage", ["fp16", "bf16", "int8"])
def test_round_trip_within_the_storage_rounding(tmp_path, storage):
    path = tmp_path / "f.h5"
    data = write_store(path, storage)
    with FeatureStore(path, {"storage": storage}) as fs, h5py.File(path) as f:
        assert fs.storage == storage and fs.attrs["storage"] == storage
        for r, image_id in enumerate(IDS):
            got = read(fs, image_id)
            for name, x in ((n, data[n][r]) for n in DIGESTED):
                assert got[name].dtype == np.float16 and got[name].shape == SHAPES[name]
                assert f[name].dtype == CODES[storage] and f[name].chunks == (1, *SHAPES[name])
                err = np.abs(got[name].astype(np.float64) - x)
                if storage == "fp16":
                    np.testing.assert_array_equal(got[name], x.astype(np.float16))
                elif storage == "bf16":  # 8 significant bits, nearest: relative 2^-8 (float16 holds it)
                    assert np.all(err <= 2.0**-8 * np.abs(x) + 2.0**-24)
                else:  # codes round(x / s): half a step; the float16 result adds its own rounding
                    scale = f[SCALES[name]][r].astype(np.float64)[..., None]
                    assert np.all(np.abs(x).max(axis=-1, keepdims=True) <= 127 * scale)  # nothing clips
                    assert np.all(err <= scale / 2 + 2.0**-11 * np.abs(got[name]) + 1e-12)
            np.testing.assert_array_equal(fs.cls_tokens(image_id), got["tokens"][:, 0])
        assert fs.read_all("tokens").dtype == np.float16
        np.testing.assert_array_equal(fs.read_all("patch_keys")[2], fs.patch_keys("c"))
        assert set(f) == set(DATASETS) | ({*SCALES.values()} if storage == "int8" else set())


def test_fp16_store_is_todays_layout_and_bytes(tmp_path):
    """Default and explicit fp16 write the same file: float16 rows, one per chunk, CRC-32 of their bytes
    seeded as before, no extra dataset; the only new attribute is ``storage``."""
    default, explicit = tmp_path / "default.h5", tmp_path / "fp16.h5"
    data = write_store(default, None)
    write_store(explicit, "fp16")
    with h5py.File(default) as f, h5py.File(explicit) as g:
        assert set(f) == set(DATASETS) == set(g)
        assert set(f.attrs) == {*attrs(), "storage", "image_ids_sha256", "complete"}
        assert f.attrs["storage"] == "fp16"
        for name in (*DIGESTED, "digests", "done"):
            assert f[name].dtype == g[name].dtype and f[name].chunks == g[name].chunks and f[name].fletcher32
            np.testing.assert_array_equal(f[name][()], g[name][()])
        for r, image_id in enumerate(IDS):
            for c, name in enumerate(DIGESTED):
                row = data[name][r].astype(np.float16)
                assert f[name][r].tobytes() == row.tobytes()
                seed = zlib.crc32(f"{name}\0{image_id}".encode())
                assert int(f["digests"][r, c]) == zlib.crc32(row.tobytes(), seed)
    assert default.stat().st_size == explicit.stat().st_size


@pytest.mark.parametrize("part", ["codes", "scale"])
def test_crc_detects_a_changed_byte_of_an_int8_row_or_its_scale(tmp_path, part):
    """A change written through HDF5 (so Fletcher32 is recomputed and passes) fails the row's CRC-32."""
    path = tmp_path / "f.h5"
    write_store(path, "int8")
    name = "tokens" if part == "codes" else SCALES["tokens"]
    with h5py.File(path, "r+") as f:
        row = f[name][1]
        row.view(np.uint8).reshape(-1)[3] ^= 0x01
        f[name][1] = row
    with FeatureStore(path) as fs:
        fs.tokens("a")  # other rows read
        with pytest.raises(FscsError, match=r"dataset 'tokens' is damaged: rows 1 \('b'\) .*CRC-32"):
            fs.tokens("b")
        assert fs.damaged_rows("tokens") == [1]


def test_fletcher32_guards_a_scale_chunk(tmp_path):
    path = tmp_path / "f.h5"
    write_store(path, "int8")
    with h5py.File(path) as f:
        info = f[SCALES["patch_keys"]].id.get_chunk_info_by_coord((2, 0, 0))
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    with FeatureStore(path) as fs, pytest.raises(FscsError, match=r"'patch_keys' is damaged: rows 2 \('c'\)"):
        fs.patch_keys("c")


def test_other_storage_refused_and_old_stores_read_as_fp16(tmp_path):
    path = tmp_path / "f.h5"
    write_store(path, "int8")
    fp16 = expected_attrs(validate_section("backbone", {"name": "vit_tiny_random"}))
    assert fp16["storage"] == "fp16"
    with pytest.raises(
        FscsError, match=r"attribute 'storage' is 'int8' in the store but the params ask for 'fp16'"
    ):
        FeatureStore(path, {"storage": fp16["storage"]})
    wanted = expected_attrs(validate_section("backbone", {"name": "vit_tiny_random", "storage": "int8"}))
    FeatureStore(path, {"storage": wanted["storage"]}).close()
    old = tmp_path / "old.h5"
    write_store(old, "fp16")
    with h5py.File(old, "r+") as f:
        del f.attrs["storage"]  # written before the attribute existed
    FeatureStore(old, {"storage": "fp16"}).close()
    with pytest.raises(
        FscsError, match=r"attribute 'storage' is 'fp16' in the store but the params ask for 'bf16'"
    ):
        FeatureStore(old, {"storage": "bf16"})
    with pytest.raises(FscsError, match=r"backbone.storage must be one of"):
        StoreWriter(tmp_path / "x.h5", IDS, attrs(), SHAPES, storage="fp8")


def test_partial_resumed_only_for_the_same_storage(tmp_path):
    path = tmp_path / "f.h5"
    data = write_store(path, "int8", upto=4, finalize=False)
    w = StoreWriter(path, IDS, attrs(), SHAPES, storage="bf16")
    assert not w.resumed and not w.done.any()
    w.close()
    write_store(path, "int8", upto=4, finalize=False)
    w = StoreWriter(path, IDS, attrs(), SHAPES, storage="int8")
    assert w.resumed and int(w.done.sum()) == 4
    w.write([4, 5], *(data[name][4:] for name in DIGESTED))
    w.finalize()
    with FeatureStore(path, {"storage": "int8"}) as fs:
        assert fs.damaged_rows("tokens") == []


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_shard_join_keeps_storage_and_values(tmp_path, storage):
    shards = [tmp_path / "shards" / f"shard-{i}.h5" for i in range(2)]
    for i, shard in enumerate(shards):
        write_store(shard, storage, ids=IDS[3 * i : 3 * i + 3])
    out = tmp_path / "joined.h5"
    join_shards(shards, out, IDS, {"storage": storage})
    with FeatureStore(out, {"storage": storage}) as joined:
        assert joined.storage == storage and joined._f["tokens"].is_virtual
        assert joined.damaged_rows("tokens") == []
        for shard in shards:
            with FeatureStore(shard) as fs:
                for image_id in fs.image_ids:
                    for name, value in read(fs, image_id).items():
                        np.testing.assert_array_equal(read(joined, image_id)[name], value)
    mixed = tmp_path / "mixed.h5"
    write_store(shards[1], "fp16", ids=IDS[3:])
    with pytest.raises(FscsError, match=r"attribute 'storage' is 'fp16' but .* has '" + storage):
        join_shards(shards, mixed, IDS, None)


def test_bytes_per_image_as_predicted(tmp_path):
    """Each image adds `row_bytes` to the file (measured between stores of 8 and 16 images, so HDF5's fixed
    overhead cancels): int8 about half of fp16, bf16 the same as fp16."""
    shapes = {"tokens": (4, 65, 128), "cls_query": (4, 32), "patch_keys": (4, 64, 32)}
    size = {}
    for storage in ("fp16", "bf16", "int8"):
        files = {}
        for n in (8, 16):
            files[n] = tmp_path / f"{storage}-{n}.h5"
            write_store(files[n], storage, ids=[f"i{k}" for k in range(n)], shapes=shapes)
        size[storage] = (files[16].stat().st_size - files[8].stat().st_size) / 8
        assert size[storage] == pytest.approx(row_bytes(shapes, storage), rel=0.02)
    assert row_bytes(shapes, "bf16") == row_bytes(shapes, "fp16")
    assert size["bf16"] == pytest.approx(size["fp16"], rel=0.01) and size["int8"] < 0.53 * size["fp16"]
    values = 4 * 65 * 128 + 4 * 32 + 4 * 64 * 32
    vectors = 4 * 65 + 4 + 4 * 64
    assert row_bytes(shapes, "fp16") == 2 * values + 3 * 4 + 1 + 3 * 4
    assert row_bytes(shapes, "int8") == values + 2 * vectors + 3 * 4 + 1 + 6 * 4
    paper = {"tokens": (12, 2501, 384), "cls_query": (6, 64), "patch_keys": (6, 2500, 64)}
    assert row_bytes(paper, "fp16") == pytest.approx(25.0e6, rel=0.01)  # the paper's 400 px: 25 MB/image
    assert row_bytes(paper, "int8") == pytest.approx(12.58e6, rel=0.01)
