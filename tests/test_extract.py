"""Stage `extract_shard`: index -> feature store + report; bad images; kill -9 mid-way and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from fscs.config.params import validate_section
from fscs.core.errors import FscsError
from fscs.data.images import load_rgb
from fscs.features.backbone import create_backbone
from fscs.features.store import FeatureStore, expected_attrs, partial_path
from stages import extract_shard as stage

ROOT = Path(__file__).resolve().parents[1]
MSRC = ROOT.parent / "shared" / "data" / "msrc-v2" / "JPEGImages"


def expect(params: dict) -> dict:
    """The store attributes params.yaml's ``backbone`` section expects."""
    return expected_attrs(validate_section("backbone", params["backbone"]))


def make_images(folder: Path, n: int, seed: int = 0) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 256, (24 + 3 * i, 40 - 2 * i, 3), dtype=np.uint8)
        path = folder / (f"im{i}.png" if i % 2 else f"im{i}.jpg")
        Image.fromarray(arr).save(path)
        rows.append({"image_id": f"id{i}", "split": "train", "image_path": str(path)})
    return pd.DataFrame(rows)


def setup(tmp_path: Path, n: int = 7, batch_size: int = 2, name: str = "vit_tiny_random", size: int = 32):
    df = make_images(tmp_path / "img", n)
    index = tmp_path / "index.parquet"
    df.to_parquet(index)
    params = {"backbone": {"name": name, "input_size": size, "layers": "all", "batch_size": batch_size}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    return df, index, params_file, params


def argv(tmp_path, index, params_file, out="f.h5"):
    return [
        "--index", str(index), "--out", str(tmp_path / out),
        "--report", str(tmp_path / "extract.json"), "--params", str(params_file),
    ]  # fmt: skip


def test_stage_round_trips_exactly(tmp_path, capsys):
    df, index, params_file, params = setup(tmp_path)
    stage.main(argv(tmp_path, index, params_file))
    assert "extract: 7 images ->" in capsys.readouterr().out
    bb = create_backbone("vit_tiny_random", 32)
    with FeatureStore(tmp_path / "f.h5", expect(params)) as fs:
        assert fs.image_ids == list(df.image_id)
        assert (
            fs.grid == (4, 4)
            and fs.num_heads == 2
            and fs.attrs["weights_sha256"] == bb.provenance.weights_sha256
        )
        assert fs.attrs["layers"] == [0, 1, 2] and fs.attrs["input_size"] == 32
        # batches of 2 as in the stage: same GEMM shapes, so bit-identical features
        for start in range(0, 7, 2):
            ids = list(df.image_id[start : start + 2])
            x = bb.preprocess_batch([load_rgb(p) for p in df.image_path[start : start + 2]])
            f = bb.extract(x)
            for j, iid in enumerate(ids):
                np.testing.assert_array_equal(fs.tokens(iid), f.tokens[j].half().numpy())
                np.testing.assert_array_equal(fs.cls_query(iid), f.cls_query[j].half().numpy())
                np.testing.assert_array_equal(fs.patch_keys(iid), f.patch_keys[j].half().numpy())
    report = json.loads((tmp_path / "extract.json").read_text())
    for key in ("images", "seconds", "images_per_s", "bytes_per_image", "store_bytes", "backbone"):
        assert key in report
    assert report["images"] == 7 and report["store_bytes"] == (tmp_path / "f.h5").stat().st_size
    assert report["backbone"]["name"] == "vit_tiny_random" and report["backbone"]["depth"] == 3
    assert not partial_path(tmp_path / "f.h5").exists()


def test_layer_subset(tmp_path):
    df, index, params_file, params = setup(tmp_path, n=3)
    params["backbone"]["layers"] = [-1]
    params_file.write_text(yaml.safe_dump(params))
    stage.main(argv(tmp_path, index, params_file))
    with FeatureStore(tmp_path / "f.h5", expect(params)) as fs:
        assert fs.tokens("id0").shape == (1, 17, 48) and fs.layers == [2]


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_bad_image_errors_with_its_path_before_any_output(tmp_path, problem):
    df, index, params_file, _ = setup(tmp_path, n=4)
    bad = Path(df.image_path[2])
    if problem == "missing":
        bad.unlink()
    else:
        bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(FscsError, match=str(bad)):
        stage.main(argv(tmp_path, index, params_file))
    assert not (tmp_path / "f.h5").exists() and not partial_path(tmp_path / "f.h5").exists()
    assert not (tmp_path / "extract.json").exists()


def test_stage_cli_exit_code_and_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stages.extract_shard", "--index", str(tmp_path / "none.parquet"), "--out",
         str(tmp_path / "f.h5"), "--report", str(tmp_path / "r.json"), "--params", str(ROOT / "params.yaml")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "none.parquet: image index not found" in proc.stderr


def test_index_problems(tmp_path):
    df, index, params_file, _ = setup(tmp_path, n=2)
    pd.DataFrame({"image_id": ["a", "a"], "image_path": df.image_path}).to_parquet(index)
    with pytest.raises(FscsError, match="duplicate image_id 'a'"):
        stage.main(argv(tmp_path, index, params_file))
    pd.DataFrame({"image_id": ["a"]}).to_parquet(index)
    with pytest.raises(FscsError, match="cannot read image_id and image_path"):
        stage.main(argv(tmp_path, index, params_file))


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import pandas as pd
    from fscs.features.backbone import create_backbone
    from fscs.features.extraction import extract_to_store
    df = pd.read_parquet(sys.argv[1])
    bb = create_backbone("vit_tiny_random", 32)

    def on_batch(done):
        if done >= int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)

    extract_to_store(bb, list(df.image_id), list(df.image_path), sys.argv[2], batch_size=2, on_batch=on_batch)
    """
)


def extract_then_kill(tmp_path, index, out, after_rows: int) -> subprocess.CompletedProcess:
    """Run an extraction in a subprocess that kill -9s itself once `after_rows` rows are flushed."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(script), str(index), str(out), str(after_rows)], env=env, cwd=ROOT
    )


def test_kill_9_mid_way_then_resume_gives_identical_store(tmp_path):
    df, index, params_file, params = setup(tmp_path, n=7, batch_size=2)
    out = tmp_path / "f.h5"
    proc = extract_then_kill(tmp_path, index, out, after_rows=4)
    assert proc.returncode == -9  # killed after two batches were flushed
    assert partial_path(out).exists() and not out.exists()
    with pytest.raises(FscsError, match="not found .*unfinished"):
        FeatureStore(out)
    partial_copy = tmp_path / "copy.h5"
    partial_copy.write_bytes(partial_path(out).read_bytes())
    with pytest.raises(FscsError, match="incomplete"):
        FeatureStore(partial_copy)

    stage.main(argv(tmp_path, index, params_file))  # resumes
    report = json.loads((tmp_path / "extract.json").read_text())
    assert report["resumed_rows"] == 4 and report["computed"] == 3
    stage.main(argv(tmp_path, index, params_file, out="clean.h5"))  # from scratch
    with (
        FeatureStore(out, expect(params)) as a,
        FeatureStore(tmp_path / "clean.h5") as b,
    ):
        assert a.image_ids == b.image_ids
        for name in ("tokens", "cls_query", "patch_keys"):
            np.testing.assert_array_equal(a.read_all(name), b.read_all(name))


def test_partial_for_other_images_is_rebuilt(tmp_path):
    df, index, params_file, params = setup(tmp_path, n=5, batch_size=2)
    out = tmp_path / "f.h5"
    extract_then_kill(tmp_path, index, out, after_rows=2)
    assert partial_path(out).exists()
    df.iloc[1:].to_parquet(index)  # a different image list, same params
    stage.main(argv(tmp_path, index, params_file))
    report = json.loads((tmp_path / "extract.json").read_text())
    assert report["resumed_rows"] == 0 and report["computed"] == 4
    with FeatureStore(out) as fs:
        assert fs.image_ids == list(df.image_id[1:])


@pytest.mark.slow
def test_real_backbone_on_msrc_images(tmp_path):
    files = sorted(MSRC.glob("*.jpg"))[:3]
    if len(files) < 3:
        pytest.skip("MSRC images not available")
    index = tmp_path / "index.parquet"
    pd.DataFrame({"image_id": [f.stem for f in files], "image_path": [str(f) for f in files]}).to_parquet(
        index
    )
    params = {
        "backbone": {"name": "dinov2_vits14_imgfocus", "input_size": 224, "layers": "all", "batch_size": 2}
    }
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    stage.main(argv(tmp_path, index, params_file))
    with FeatureStore(tmp_path / "f.h5", expect(params)) as fs:
        t = fs.tokens(files[0].stem)
        assert t.shape == (12, 257, 384) and np.isfinite(t).all()
        assert fs.patch_keys(files[1].stem).shape == (6, 256, 64) and fs.grid == (16, 16)
        # last-block CLS attention is not uniform: some patches stand out
        q = fs.cls_query(files[0].stem).astype(np.float32)
        k = fs.patch_keys(files[0].stem).astype(np.float32)
        logits = np.einsum("hd,hpd->hp", q, k) / 8.0
        attn = np.exp(logits - logits.max(1, keepdims=True))
        attn /= attn.sum(1, keepdims=True)
        assert attn.max() > 5.0 / 256
    report = json.loads((tmp_path / "extract.json").read_text())
    assert report["backbone"]["weights_sha256"] == fs.attrs["weights_sha256"]
    assert 2_000_000 < report["bytes_per_image"] < 3_000_000
