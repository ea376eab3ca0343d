"""Pseudo-label recipes, the Labeler, the overlay helpers and the `pseudo` stage on a synthetic store."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import yaml

from fscs.config.params import validate
from fscs.core.errors import FscsError
from fscs.core.iou import IoUCounter
from fscs.core.overlay import overlay, palette, save_grid
from fscs.core.resample import bilinear
from fscs.pseudo.attention import (
    Labeler,
    cst_foreground,
    dino_attention,
    dino_foreground,
    head_cosine,
    mass_mask,
    read_self_maps,
    to_mask,
)
from fscs.pseudo.quality import sample_pairs

# ------------------------------------------------------------------------- synthetic store for tests
GRID = (4, 4)
HEADS, DIM = 2, 8


def synthetic_store(path, masks: dict[str, np.ndarray], params: dict, seed: int = 0) -> None:
    """A complete feature store written with the real StoreWriter: the CLS query of an image is the
    direction of its dominant class (the class of most labelled pixels); a patch key is +direction of the
    patch's majority class, so self maps light up the dominant class and pair maps the support's class."""
    from fscs.features.store import NORMALIZATION, STORE_VERSION, StoreWriter

    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((256, HEADS, DIM)).astype(np.float32)
    ids = sorted(masks)
    gh, gw = GRID
    p = gh * gw
    attrs = {
        "backbone": params["backbone"]["name"],
        "arch": "vit_tiny_random",
        "weights_sha256": "0" * 64,
        "source": "synthetic",
        "input_size": params["backbone"]["input_size"],
        "patch_size": 8,
        "grid": [gh, gw],
        "layers": [0, 1, 2],
        "depth": 3,
        "num_heads": HEADS,
        "embed_dim": HEADS * DIM,
        "normalization": NORMALIZATION,
        "code_version": STORE_VERSION,
    }
    shapes = {"tokens": (3, 1 + p, HEADS * DIM), "cls_query": (HEADS, DIM), "patch_keys": (HEADS, p, DIM)}
    with StoreWriter(path, ids, attrs, shapes) as w:
        for r, image_id in enumerate(ids):
            m = masks[image_id]
            h, w_ = m.shape
            cells = np.zeros(p, dtype=np.int64)
            for i in range(gh):
                for j in range(gw):
                    block = m[i * h // gh : (i + 1) * h // gh, j * w_ // gw : (j + 1) * w_ // gw].ravel()
                    block = block[block != 255]
                    cells[i * gw + j] = np.bincount(block, minlength=256).argmax() if block.size else 0
            counts = np.bincount(m[m != 255].ravel(), minlength=256)
            counts[0] = 0
            dominant = int(counts.argmax())
            q = dirs[dominant]
            keys = np.stack([dirs[c] if c == dominant else -dirs[dominant] for c in cells], axis=1)
            keys = keys + 0.05 * rng.standard_normal(keys.shape).astype(np.float32)
            tokens = rng.standard_normal(shapes["tokens"]).astype(np.float32)
            w.write([r], tokens[None], q[None], keys[None])
        w.finalize()


@pytest.fixture
def tiny_world(voc_fixture, tmp_path, monkeypatch):
    """Index + folds from the prepare stage on the VOC fixture, a synthetic store, a params file."""
    from fscs.data.images import load_mask
    from fscs.data.index import read_index
    from stages import prepare

    params = dict(voc_fixture.params)
    params["episodes"] = {
        **params["episodes"],
        "test_per_fold": 2,
        "val_per_fold": 2,
        "ways": [1],
        "shots": [1],
    }
    params["backbone"] = {"name": "vit_tiny_random", "input_size": 32, "layers": "all", "batch_size": 4}
    params["pseudo"] = {
        "recipe": "cst",
        "cst_threshold": 0.4,
        "dino_mass": 0.6,
        "dino_heads": "mean",
        "dino_mass_sweep": [0.5, 0.6],
        "sweep": [0.3, 0.5],
        "pairs_per_label": 1,
        "seed": 0,
        "stuff_classes": ["sky", "tree"],
    }
    params["mixed"] = {"fraction": 0.25, "seed": 0, "sweep": [0.25]}
    params["enhancer"] = {
        "steps": 60,
        "batch_size": 8,
        "lr": 0.002,
        "seed": 0,
        "inputs": "both",
        "per_fold": True,
        "train_classes": "objects",
    }
    ppath = tmp_path / "params.yaml"
    ppath.write_text(yaml.safe_dump(params))
    idx, eps = tmp_path / "index.parquet", tmp_path / "episodes"
    prepare.main(["--params", str(ppath), "--index", str(idx), "--episodes", str(eps)])
    index = read_index(idx)
    masks = {i: load_mask(index.loc[i, "mask_path"]) for i in index.index}
    store = tmp_path / "features.h5"
    synthetic_store(store, masks, params)
    return type(
        "World",
        (),
        {
            "params": ppath,
            "index": idx,
            "folds": eps / "folds.json",
            "store": store,
            "tmp": tmp_path,
            "raw": params,
        },
    )


# ----------------------------------------------------------------------------------------- recipes
def test_head_cosine_known_answers():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 5)).astype(np.float32)
    ortho = rng.standard_normal((3, 5)).astype(np.float32)
    ortho -= (ortho * q).sum(-1, keepdims=True) / (q * q).sum(-1, keepdims=True) * q  # orthogonal to q
    keys = np.stack([q, -q, 2.0 * q, ortho], axis=1)  # (3, 4, 5)
    cos = head_cosine(q, keys)
    assert cos.shape == (3, 4) and cos.dtype == np.float32
    np.testing.assert_allclose(cos, [[1.0, -1.0, 1.0, 0.0]] * 3, atol=1e-5)
    fg = cst_foreground(cos)
    assert fg.shape == (4,)
    np.testing.assert_allclose(fg, [1.0, 0.0, 1.0, 0.5], atol=1e-5)
    # float16 inputs as stored
    np.testing.assert_allclose(head_cosine(q.astype(np.float16), keys.astype(np.float16)), cos, atol=2e-3)


def test_centered_cosine_removes_shared_key():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 6)).astype(np.float32)
    shared = 5.0 * q  # a large component common to every key (as in DINOv2's last block)
    signs = np.array([1, -1, 1, -1], np.float32)
    keys = shared[:, None, :] + signs[None, :, None] * q[:, None, :]
    raw = head_cosine(q, keys)
    assert (raw > 0.9).all()  # the shared part dominates: every patch looks like foreground
    centered = head_cosine(q, keys, center=True)
    np.testing.assert_allclose(centered, np.tile(signs, (2, 1)), atol=1e-5)
    # softmax attention does not change with the shared part (shift invariance), the cosine does
    np.testing.assert_allclose(
        dino_attention(q, keys), dino_attention(q, keys - shared[:, None, :]), atol=1e-5
    )


def test_cst_foreground_is_head_mean():
    cos = np.array([[1.0, 0.0, -1.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(cst_foreground(cos), [0.75, 0.5, 0.5])


def test_head_cosine_bad_shapes():
    with pytest.raises(FscsError):
        head_cosine(np.zeros((2, 4)), np.zeros((3, 5, 4)))


def test_dino_attention_and_mass():
    q = np.zeros((2, 4), np.float32)
    q[:, 0] = 4.0
    keys = np.zeros((2, 6, 4), np.float32)
    keys[0, 2, 0] = 10.0  # head 0 peaked on patch 2
    keys[1, 4, 0] = 10.0  # head 1 peaked on patch 4
    attn = dino_attention(q, keys)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-6)
    assert attn[0].argmax() == 2 and attn[0, 2] > 0.99  # exp(40/2) dominates
    # the smallest set holding 60% of the mass is the single peak
    assert mass_mask(attn, 0.6).sum(-1).tolist() == [1, 1]
    # uniform attention: 60% of 10 positions needs 6
    assert mass_mask(np.full(10, 0.1), 0.6).sum() == 6
    assert mass_mask(np.array([0.5, 0.3, 0.2]), 0.6).tolist() == [True, True, False]
    union = dino_foreground(q, keys, 0.6, "union")
    assert union.tolist() == [0, 0, 1, 0, 1, 0]
    assert dino_foreground(q, keys, 0.6, "vote").tolist() == [0, 0, 1, 0, 1, 0]  # each kept by 1 of 2 heads
    mean = dino_foreground(q, keys, 0.4, "mean")  # head-mean attention is ~0.5 on each peak
    assert mean.sum() == 1 and mean[[2, 4]].sum() == 1
    assert dino_foreground(q, keys, 0.6, "mean").tolist() == [0, 0, 1, 0, 1, 0]
    with pytest.raises(FscsError):
        dino_foreground(q, keys, 0.6, "max")


def test_upsample_and_to_mask():
    m = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    up = bilinear(m, 4)
    assert up.shape == (4, 4) and up.dtype == np.float32
    np.testing.assert_allclose(up[0], [0.0, 0.25, 0.75, 1.0])  # align_corners=False
    assert bilinear(np.stack([m, 1 - m]), (3, 6)).shape == (2, 3, 6)
    mask = to_mask(m, 0.5, (4, 6))
    assert mask.dtype == bool and mask.shape == (4, 6)
    assert mask[:, :3].sum() == 0 and mask[:, 3:].all()
    assert to_mask(m, 0.5, 8).shape == (8, 8)
    with pytest.raises(FscsError):
        bilinear(np.zeros(4), 8)


class FakeStore:
    """Two images: 'a' whose keys agree with its CLS on the left column, 'b' on the right column."""

    grid = (2, 2)
    num_heads = 2
    attrs = {"grid": [2, 2], "num_heads": 2}

    def __init__(self):
        rng = np.random.default_rng(0)
        self.q = {k: rng.standard_normal((2, 4)).astype(np.float32) for k in ("a", "b")}
        left, right = np.array([1, -1, 1, -1.0]), np.array([-1, 1, -1, 1.0])
        self.k = {
            "a": self.q["a"][:, None, :] * left[None, :, None],
            "b": self.q["a"][:, None, :] * right[None, :, None],  # b's keys agree with a's CLS on the right
        }
        self.reads = 0

    def cls_query(self, i):
        return self.q[i].astype(np.float16)

    def patch_keys(self, i):
        self.reads += 1
        return self.k[i].astype(np.float16)


def test_labeler_self_pair_and_absent_rule():
    store = FakeStore()
    lab = Labeler(store, recipe="cst", threshold=0.4, center_keys=False)
    fg = lab.support_fg("a")
    assert fg.shape == (2, 2) and fg.dtype == np.float32
    np.testing.assert_allclose(fg, [[1, 0], [1, 0]], atol=2e-3)
    reads = store.reads
    assert lab.support_fg("a") is fg and store.reads == reads  # cached
    pair = lab.pair_fg("a", "b")
    np.testing.assert_allclose(pair, [[0, 1], [0, 1]], atol=2e-3)
    absent = lab.pair_fg("a", "b", present=False)
    assert absent.shape == (2, 2) and not absent.any()
    assert not lab.pair_mask("a", "b", (5, 7), present=False).any()
    m = lab.pair_mask("a", "b", 4)
    assert m.shape == (4, 4) and m[:, 2:].all() and not m[:, :2].any()
    assert lab.support_mask("a", (4, 4))[:, :2].all()
    d = Labeler(store, recipe="dino", dino_mass=0.6, dino_heads="mean")
    assert d.mask_threshold == 0.5 and set(np.unique(d.support_fg("a"))) <= {0.0, 1.0}
    with pytest.raises(FscsError):
        Labeler(store, recipe="crf")


def test_iou_counter_and_pairs():
    c = IoUCounter([0.5])
    fg = np.array([[1.0, 1.0], [0.0, 0.0]])
    target = np.array([[True, False], [False, False]])
    valid = np.array([[True, True], [True, False]])
    c.add(3, fg, target, valid)
    assert c.iou(3) == 50.0 and c.miou() == 50.0 and c.per_class() == {"3": 50.0}
    c.add(4, fg, ~target & valid, valid)  # pred {(0,0),(0,1)}, target {(0,1),(1,0)}
    assert c.iou(4) == pytest.approx(100 / 3)
    labels = {"x": [1, 2], "y": [1], "z": [2], "w": [1]}
    pairs = sample_pairs(labels, [1, 2], 1, seed=0)
    assert pairs == sample_pairs(labels, [1, 2], 1, seed=0)
    assert all(s != q and c in labels[s] and c in labels[q] for s, q, c in pairs)
    assert len(pairs) == 5  # x:1, x:2, y:1, z:2, w:1
    assert len(sample_pairs(labels, [1, 2], 5, seed=0)) == 2 + 1 + 2 + 1 + 2


# ------------------------------------------------------------------------------------------ overlay
def test_overlay_and_grid(tmp_path):
    img = np.full((6, 8, 3), 100, np.uint8)
    lab = np.zeros((6, 8), np.int64)
    lab[:, 4:] = 3
    lab[0] = 255
    out = overlay(img, lab, 0.5)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert (out[3, 1] == 100).all()  # background untouched
    assert not (out[3, 6] == 100).all()  # class painted
    assert overlay(img, np.zeros((3, 4), bool), 0.5).shape == (3, 4, 3)  # image resized to the map
    assert palette(1) != palette(2) and palette(255) == (1.0, 1.0, 1.0)
    path = tmp_path / "figs" / "grid.png"
    save_grid([[out, out, lab.astype(np.uint8)], [out, out, out]], path, titles=["a", "b", "c"])
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FscsError):
        save_grid([[out], [out, out]], path)


# ------------------------------------------------------------------------------------------ stage
def pseudo_argv(w, out, report, plot) -> list[str]:
    """The pseudo stage's arguments on the tiny world."""
    inputs = ["--params", w.params, "--index", w.index, "--folds", w.folds, "--features", w.store]
    return [str(a) for a in [*inputs, "--out", out, "--report", report, "--plot", plot]]


def test_pseudo_stage(tiny_world):
    from stages import pseudo as stage

    w = tiny_world
    out, report, plot = w.tmp / "pseudo.h5", w.tmp / "pseudo.json", w.tmp / "plots" / "p.csv"
    stage.main(pseudo_argv(w, out, report, plot))
    ids, maps, attrs = read_self_maps(out)
    assert maps.shape == (len(ids), HEADS, *GRID) and maps.dtype == np.float16
    assert attrs["recipe"] == "cst" and attrs["backbone"] == "vit_tiny_random"
    rep = json.loads(report.read_text())
    for key in ("recipe", "threshold", "self", "pair", "dino", "sweep", "objects"):
        assert key in rep
    assert 0 <= rep["pair"]["miou"] <= 100 and rep["images"] == 42
    # the synthetic keys mark the dominant class (left half) exactly: its IoU is high
    assert rep["self"]["miou"] > 50
    assert [r["threshold"] for r in rep["sweep"]] == [0.3, 0.4, 0.5]
    rows = list(csv.DictReader(plot.open()))
    assert {r["recipe"] for r in rows} == {"cst_self", "cst_pair", "cst_centered_self", "cst_centered_pair"}
    assert len(rows) == 12
    assert attrs["center_keys"] and rep["center_keys"] and "cst" in rep and "cst_centered" in rep
    # Labeler reading the pseudo file gives the same maps as from the store
    from fscs.features.store import FeatureStore

    with FeatureStore(w.store) as store:
        a, b = Labeler(store), Labeler(store, pseudo_path=out)
        np.testing.assert_allclose(a.support_fg(ids[0]), b.support_fg(ids[0]), atol=2e-3)
        c = Labeler.from_config(store, validate(w.raw).pseudo, pseudo_path=out)
        assert c.threshold == 0.4 and c.center_keys
        with pytest.raises(FscsError, match="center_keys"):
            Labeler(store, pseudo_path=out, center_keys=False)


def test_pseudo_stage_bad_input_writes_nothing(tiny_world):
    from stages import pseudo as stage

    w = tiny_world
    raw = dict(w.raw)
    raw["pseudo"] = {**raw["pseudo"], "recipe": "crf"}
    bad = w.tmp / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    out = w.tmp / "never.h5"
    argv = ["--index", str(w.index), "--folds", str(w.folds), "--features", str(w.store)]
    tail = ["--out", str(out), "--report", str(w.tmp / "r.json"), "--plot", str(w.tmp / "p.csv")]
    with pytest.raises(FscsError, match="pseudo.recipe"):
        stage.main(["--params", str(bad), *argv, *tail])
    raw["pseudo"] = {**w.raw["pseudo"], "stuff_classes": ["lava"]}
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(FscsError, match="lava"):
        stage.main(["--params", str(bad), *argv, *tail])
    with pytest.raises(FscsError, match="feature store not found"):
        stage.main(["--params", str(w.params), *argv[:4], "--features", str(w.tmp / "none.h5"), *tail])
    assert not out.exists() and not (w.tmp / "r.json").exists()


def test_labeler_checks_provenance(tiny_world):
    from fscs.features.store import FeatureStore
    from stages import pseudo as stage

    w = tiny_world
    out = w.tmp / "pseudo.h5"
    stage.main(pseudo_argv(w, out, w.tmp / "r.json", w.tmp / "p.csv"))
    with h5py.File(out, "r+") as f:
        f.attrs["backbone"] = "dino_vits8"
    with FeatureStore(w.store) as store, pytest.raises(FscsError, match="backbone"):
        Labeler(store, pseudo_path=out)


@pytest.mark.slow
def test_pseudo_stage_on_msrc(tmp_path):
    """The real MSRC store (made by `dvc repro extract`): centred cst beats the all-foreground floor."""
    from pathlib import Path

    from stages import pseudo as stage

    root = Path(__file__).resolve().parent.parent
    need = [
        root / "data/features/msrc.h5",
        root / "data/index/msrc.parquet",
        root / "data/episodes/msrc/folds.json",
    ]
    if not all(p.is_file() for p in need):
        pytest.skip("needs the MSRC feature store, index and folds (dvc repro extract)")
    report = tmp_path / "pseudo.json"
    stage.main(
        [
            "--params", str(root / "params.yaml"),
            "--index", str(need[1]),
            "--folds", str(need[2]),
            "--features", str(need[0]),
            "--out", str(tmp_path / "pseudo.h5"),
            "--report", str(report),
            "--plot", str(tmp_path / "p.csv"),
        ]
    )  # fmt: skip
    rep = json.loads(report.read_text())
    floor = rep["all_foreground"]["self_miou"]
    assert rep["cst_centered"]["self"]["miou"] > floor + 2
    assert rep["cst"]["self"]["miou"] == pytest.approx(floor, abs=0.5)  # raw DINOv2 keys: all foreground
