"""Bad-input probes kept as tests: each ends in exit code 2 with one line naming the file or param,
and an earlier output in the target folder stays byte-identical (nothing added, no `.partial`)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import build_voc
from PIL import Image

from fscs.cli import main as cli_main
from fscs.core.errors import FscsError
from fscs.data.images import PIXEL_LIMIT_ENV, load_mask, load_rgb
from fscs.features.store import FeatureStore
from stages._common import run_stage

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("prepare", "extract_shard", "pseudo", "enhancer", "baselines", "train", "evaluate", "report")
EARLIER = ("index.parquet", "features.h5", "extract.json", "pseudo.h5", "model.pt", "eval.json", "curve.csv")


def tiny_params(root: Path) -> dict:
    """Params for the tiny VOC fixture with the tiny random ViT and a 2-epoch CST."""
    return {
        "dataset": {
            "name": "tiny",
            "root": str(root),
            "layout": "voc",
            "train_split": "train",
            "test_split": "val",
            "min_class_pixels": 0.01,
        },
        "folds": {"n": 2, "order": "contiguous"},
        "episodes": {"seed": 0, "test_per_fold": 4, "val_per_fold": 3, "ways": [1], "shots": [1]},
        "backbone": {"name": "vit_tiny_random", "input_size": 32, "batch_size": 16, "threads": 1},
        "train": {
            "epochs": 1,
            "episodes_per_epoch": 4,
            "batch_size": 4,
            "label_size": 16,
            "patience": 1,
            "threads": 1,
            "model": {"support_size": 4, "channels": [16, 32], "pooled_grid": 2},
        },
    }


def build(tmp: Path, params: dict) -> SimpleNamespace:
    """Write params.yaml, run prepare and extract into tmp/data; the artifact paths."""
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    d = tmp / "data"
    a = SimpleNamespace(
        params=p,
        index=d / "index.parquet",
        episodes=d / "episodes",
        folds=d / "episodes" / "folds.json",
        features=d / "features.h5",
        pseudo=d / "pseudo.h5",
    )
    stage("prepare").main(["--params", str(p), "--index", str(a.index), "--episodes", str(a.episodes)])
    args = [
        "--params",
        str(p),
        "--index",
        str(a.index),
        "--out",
        str(a.features),
        "--report",
        str(d / "x.json"),
    ]
    stage("extract_shard").main(args)
    return a


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("refusals")
    build_voc(tmp / "voc", per_class=4)
    return build(tmp, tiny_params(tmp / "voc"))


def stage(name: str):
    return importlib.import_module(f"stages.{name}")


def stage_argv(name: str, a: SimpleNamespace | None, out: Path, params: Path) -> list[str]:
    """Arguments of stage ``name`` reading the artifacts ``a`` and writing into ``out``."""
    a = a or SimpleNamespace(
        **dict.fromkeys(("index", "folds", "episodes", "features", "pseudo"), out / "none")
    )
    data = ["--index", a.index, "--folds", a.folds, "--episodes", a.episodes, "--features", a.features]
    cell = ["--supervision", "pixel", "--fold", "0", *data]
    argv = {
        "prepare": ["--index", out / "index.parquet", "--episodes", out / "episodes"],
        "extract_shard": ["--index", a.index, "--out", out / "features.h5", "--report", out / "extract.json"],
        "pseudo": [*data[:4], "--features", a.features, "--out", out / "pseudo.h5"]
        + ["--report", out / "pseudo.json", "--plot", out / "plot.csv"],
        "enhancer": [*data[:4], "--features", a.features, "--pseudo", a.pseudo, "--model", out / "enh.pt"]
        + ["--out", out / "enh.h5", "--report", out / "enh.json", "--figures", out / "figures"],
        "baselines": ["--fold", "0", *data, "--pseudo", a.pseudo, "--out", out / "b.json", "--quiet"],
        "train": [*cell, "--out", out / "model.pt", "--curve", out / "curve.csv"],
        "evaluate": [*cell, "--checkpoint", out / "model.pt", "--out", out / "eval.json"],
        "report": ["--eval-dir", out / "eval", "--index", a.index, "--episodes", a.episodes]
        + ["--features", a.features, "--models", out / "models", "--metrics", out / "metrics.json"]
        + ["--summary", out / "summary.json", "--readme", out / "README.md", "--figures", out / "figures"],
    }[name]
    return ["--params", str(params), *map(str, argv)]


def earlier_outputs(out: Path) -> dict[str, bytes]:
    """Fill ``out`` with an earlier run's outputs; their bytes by name."""
    out.mkdir(parents=True, exist_ok=True)
    for name in EARLIER:
        (out / name).write_bytes(f"earlier {name}".encode())
    return snapshot(out)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(name: str, argv: list[str], capsys) -> str:
    """Run a stage as its CLI does; assert exit code 2 and return the one error line."""
    with pytest.raises(SystemExit) as exc:
        run_stage(stage(name).main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def with_param(params: dict, where: str, key: str, value) -> dict:
    p = yaml.safe_load(yaml.safe_dump(params))
    section = p
    for part in where.split("."):
        section = section.setdefault(part, {})
    section[key] = value
    return p


# ---- rows 1-3: params (unknown keys, wrong types, out of range) -------------------------------------------
PARAM_PROBES = [
    ("episodes", "test_per_folds", 5, "unknown key 'episodes.test_per_folds' (known: seed, test_per_fold"),
    ("backbone", "input_sizes", 224, "unknown key 'backbone.input_sizes' (known: name, input_size"),
    ("train", "epoch", 2, "unknown key 'train.epoch' (known: seed, epochs"),
    ("dataset", "min_class_pixels", "abc", "dataset.min_class_pixels = 'abc': expected a number"),
    ("backbone", "input_size", "x", "backbone.input_size = 'x': expected an integer"),
    ("backbone", "batch_size", "8", "backbone.batch_size = '8': expected an integer"),
    ("train", "epochs", "abc", "train.epochs = 'abc': expected an integer"),
    ("train", "lr", "abc", "train.lr = 'abc': expected a number"),
    ("backbone", "input_size", -64, "backbone.input_size = -64: expected >= 1"),
    ("backbone", "threads", -2, "backbone.threads = -2: expected >= 0"),
    ("train.model", "support_size", -1, "train.model.support_size = -1: expected >= 1"),
    (
        "train.by_supervision.image",
        "epoch",
        2,
        "unknown key 'train.by_supervision.image.epoch' (known: seed, epochs",
    ),
    (
        "train.by_supervision.image",
        "epochs",
        0,
        "train.epochs must be >= 1, got 0 (in train.by_supervision.image)",
    ),
    (
        "train.by_supervision",
        "images",
        {},
        "train.by_supervision.images = 'images': expected 'image', 'mixed'",
    ),
]


@pytest.mark.parametrize("name", STAGES)
@pytest.mark.parametrize("where, key, value, message", PARAM_PROBES, ids=lambda v: str(v))
def test_bad_params_refused_before_work(art, tmp_path, capsys, name, where, key, value, message):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(with_param(yaml.safe_load(art.params.read_text()), where, key, value)))
    out = tmp_path / "out"
    before = earlier_outputs(out)
    line = refused(name, stage_argv(name, art, out, params), capsys)
    assert line == f"error: params: {message}" or line.startswith(f"error: params: {message}")
    assert snapshot(out) == before


def test_negative_input_size_cli_exit_2_and_no_partial(art, tmp_path):
    """The real CLI process: exit code 2, one line, nothing left behind (issue: -64 left a .partial)."""
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(with_param(yaml.safe_load(art.params.read_text()), "backbone", "input_size", -64))
    )
    out = tmp_path / "out"
    before = earlier_outputs(out)
    argv = stage_argv("extract_shard", art, out, params)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.extract_shard", *argv], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: params: backbone.input_size = -64: expected >= 1"
    assert snapshot(out) == before


# ---- row 4: a 16-bit grey PNG is scaled to 8 bits, not clipped to white ------------------------------------
def test_16bit_grey_image_decodes_scaled(art, tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    Image.fromarray(grey8, mode="L").save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 16-bit PNG (mode I;16)
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    np.testing.assert_array_equal(load_rgb(tmp_path / "g16.png"), np.repeat(grey8[:, :, None], 3, axis=2))
    # the extract stage gives the 16-bit file the same tokens as its 8-bit twin (prepare and predict read
    # images through the same load_rgb)
    index = tmp_path / "index.parquet"
    pd.DataFrame(
        {"image_id": ["g8", "g16"], "image_path": [str(tmp_path / "g8.png"), str(tmp_path / "g16.png")]}
    ).to_parquet(index)
    out = tmp_path / "f.h5"
    stage("extract_shard").main(
        [
            "--params",
            str(art.params),
            "--index",
            str(index),
            "--out",
            str(out),
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    with FeatureStore(out) as store:
        np.testing.assert_array_equal(store.tokens("g8"), store.tokens("g16"))


# ---- rows 5, 6, 8: bad masks, a VOC folder without classes.txt, a decompression bomb ---------------------
def copy_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    build_voc(root, per_class=4)
    return root


def prepare_refuses(root: Path, tmp_path: Path, capsys) -> str:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(root)))
    out = tmp_path / "out"
    before = earlier_outputs(out)
    line = refused("prepare", stage_argv("prepare", None, out, params), capsys)
    assert snapshot(out) == before
    return line


def test_16bit_mask_value_past_255_refused(tmp_path, capsys):
    root = copy_dataset(tmp_path)
    mask = root / "SegmentationClass" / "train_1_0.png"
    values = np.asarray(Image.open(mask)).astype(np.uint16)
    values[5, 5] = 263  # would wrap to class 7 as uint8
    Image.fromarray(values).save(mask)
    with pytest.raises(FscsError, match="mask value 263 is not a class id"):
        load_mask(mask)  # the one mask reader: prepare, pseudo, enhancer, baselines, evaluate
    line = prepare_refuses(root, tmp_path, capsys)
    assert str(mask) in line and "263" in line


def test_voc_folder_without_classes_txt_refused(tmp_path, capsys):
    root = copy_dataset(tmp_path)
    (root / "classes.txt").unlink()
    line = prepare_refuses(root, tmp_path, capsys)
    assert f"{root / 'classes.txt'}: not found" in line and "Annotations" in line


def predict_refused(ckpt: Path, art, out: Path, capsys) -> str:
    """Run `fscs predict` with one fixture image as support and query; assert exit 2 and no output folder,
    return what it printed to stderr."""
    image = next((art.params.parent / "voc" / "JPEGImages").glob("*.jpg"))
    argv = ["predict", "--checkpoint", str(ckpt), "--out", str(out), "--support", f"{image}:cat"]
    with pytest.raises(SystemExit) as exc:
        cli_main([*argv, "--query", str(image)])
    assert exc.value.code == 2
    assert not out.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("name", ["prepare", "extract_shard", "predict"])
def test_decompression_bomb_named_with_its_limit(art, tmp_path, capsys, monkeypatch, name):
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "100")  # Pillow refuses images past twice the limit: 24x32 > 200
    out = tmp_path / "out"
    if name == "predict":
        line = predict_refused(tiny_checkpoint(tmp_path), art, out, capsys)
    else:
        before = earlier_outputs(out)
        line = refused(name, stage_argv(name, art, out, art.params), capsys)
        assert snapshot(out) == before
    assert "decompression-bomb limit" in line and PIXEL_LIMIT_ENV in line and ".jpg" in line


# ---- row 7: a damaged feature store is detected on read, naming the file, dataset and rows --------------
def damage(path: Path, name: str, row: int, nbytes: int = 200) -> None:
    """Invert ``nbytes`` in the middle of row ``row``'s chunk of dataset ``name`` (file size unchanged).

    Inverted rather than zeroed: zeroing bytes that are already zero would leave the row intact."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info_by_coord((row,) + (0,) * (f[name].ndim - 1))
    n = min(nbytes, info.size // 2)
    start = info.byte_offset + info.size // 2 - n // 2
    with open(path, "r+b") as fh:
        fh.seek(start)
        data = fh.read(n)
        fh.seek(start)
        fh.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize("name, dataset", [("pseudo", "patch_keys"), ("train", "tokens")])
def test_damaged_store_detected_on_read(art, tmp_path, capsys, name, dataset):
    features = tmp_path / "features.h5"
    features.write_bytes(art.features.read_bytes())
    with FeatureStore(features) as store:
        image_id = "train_4_0"  # an image of a fold-0 training class: read by both stages
        row = store.row(image_id)
    damage(features, dataset, row)
    out = tmp_path / "out"
    before = earlier_outputs(out)
    a = SimpleNamespace(**{**vars(art), "features": features})
    line = refused(name, stage_argv(name, a, out, art.params), capsys)
    assert f"{features}: dataset '{dataset}' is damaged: rows {row} ({image_id!r})" in line
    assert snapshot(out) == before
    damage(features, dataset, row + 1)  # every damaged row is named, whichever row was read
    with FeatureStore(features) as store, pytest.raises(FscsError) as exc:
        getattr(store, dataset)(image_id)
    assert f"rows {row} ({image_id!r}), {row + 1} (" in str(exc.value), str(exc.value)


# ---- row 9: a forged checkpoint given to predict ----------------------------------------------------------
def tiny_checkpoint(tmp_path: Path, input_size: int = 32) -> Path:
    import torch

    from fscs.features.backbone import create_backbone
    from fscs.learn.model.cst import CST, config_from_store, save_checkpoint

    bb = create_backbone("vit_tiny_random", input_size)
    torch.manual_seed(0)
    model = CST(config_from_store(SimpleNamespace(attrs=bb.store_attrs("all"))))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(
        path, model, config_extra={"label_size": 16}, fold=0, supervision="pixel", epoch=0, val_miou=0.0
    )
    return path


def test_forged_checkpoint_refused_by_predict(art, tmp_path, capsys):
    import torch

    from fscs.features.backbone import create_backbone
    from fscs.learn.model.cst import backbone_attrs

    ckpt = tiny_checkpoint(tmp_path)
    forged = torch.load(ckpt, weights_only=True)
    # the weights of a CST for the ViT at 32 px (4x4 tokens), the backbone config of the same ViT at 48 px
    forged["config"]["backbone"] = backbone_attrs(create_backbone("vit_tiny_random", 48).store_attrs("all"))
    torch.save(forged, ckpt)
    err = predict_refused(ckpt, art, tmp_path / "pred", capsys)
    assert f"{ckpt}: its CST weights expect grid=(4, 4)" in err and "gives (6, 6)" in err


# ---- row 10: the train stage follows the too_few_images rule prepare recorded in folds.json --------------
@pytest.fixture
def rare_class(tmp_path) -> SimpleNamespace:
    """Class 6 (boat, a training class of fold 0) keeps one train image; episodes.too_few_images: drop."""
    root = tmp_path / "voc"
    build_voc(root, per_class=4)
    keep = [
        i
        for i in (root / "ImageSets/Segmentation/train.txt").read_text().split()
        if not (i.startswith("train_6_") and i != "train_6_0" or i in ("train_5_1", "train_5_3"))
    ]
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in keep))
    params = tiny_params(root)
    params["episodes"]["too_few_images"] = "drop"
    return build(tmp_path, params)


def test_training_classes_follow_folds_json(rare_class):
    import json

    from fscs.data.folds import fold_classes, training_classes

    folds = json.loads(rare_class.folds.read_text())
    assert {"class": 6, "fold": 0, "split": "train", "images": 1}.items() <= folds["too_few_images"][
        0
    ].items()
    assert fold_classes(folds, 0, "train") == [4, 5, 6]
    assert training_classes(folds, 0) == [4, 5]
    assert training_classes(folds, 1) == fold_classes(folds, 1, "train")


def test_train_stage_follows_too_few_images_rule(rare_class, tmp_path):
    out = tmp_path / "out"
    stage("train").main(stage_argv("train", rare_class, out, rare_class.params))
    assert (out / "model.pt").is_file()


def test_store_without_checksums_refused(art, tmp_path):
    """A store written before the checksums (or by other code) cannot be verified, so it is not read."""
    old = tmp_path / "old.h5"
    with h5py.File(art.features, "r") as src, h5py.File(old, "w") as dst:
        dst.attrs.update(src.attrs)
        for name in src:
            dst.create_dataset(name, data=src[name][:], dtype=src[name].dtype)
    with pytest.raises(FscsError, match=f"{old}: feature store written without checksums"):
        FeatureStore(old)
