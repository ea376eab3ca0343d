"""Labelled-subset selection, the pseudo-label enhancer and the `enhancer` stage on a synthetic store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fscs.core.errors import FscsError
from fscs.core.resample import nearest
from fscs.pseudo.enhancer import (
    DEFAULT_CONFIG,
    Enhancer,
    binary_target,
    enhance,
    load_enhancer,
    read_enhanced,
    read_labelled_ids,
    save_enhancer,
    train_enhancer,
)
from fscs.pseudo.labelled import select_labelled
from tests.test_pseudo import tiny_world  # noqa: F401 - fixture


def toy_index(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        classes = sorted({int(c) for c in rng.choice([1, 2, 3, 4, 5, 6], size=rng.integers(1, 3))})
        rows.append({"image_id": f"im{k:03d}", "split": "train" if k < 50 else "val", "classes": classes})
    rows.append({"image_id": "rare", "split": "train", "classes": [9]})  # the only image of class 9
    return pd.DataFrame(rows).set_index("image_id", drop=False)


def test_select_labelled_seeded_and_stratified():
    idx = toy_index()
    classes = [1, 2, 3, 4, 5, 6, 9]
    a = select_labelled(idx, classes, 0.1, seed=0, split="train")
    assert a == select_labelled(idx, classes, 0.1, seed=0, split="train")
    assert a != select_labelled(idx, classes, 0.1, seed=1, split="train")
    assert len(a) == round(0.1 * 51) and len(set(a)) == len(a) and a == sorted(a)
    assert "rare" in a  # stratified: every class has a labelled image
    covered = {c for i in a for c in idx.loc[i, "classes"]}
    assert set(classes) <= covered
    assert all(idx.loc[i, "split"] == "train" for i in a)
    # a fraction too small to cover every class grows to cover them
    tiny = select_labelled(idx, classes, 0.01, seed=0, split="train")
    assert set(classes) <= {c for i in tiny for c in idx.loc[i, "classes"]} and len(tiny) >= 2
    assert len(select_labelled(idx, classes, 1.0, seed=0, split="train")) == 51
    with pytest.raises(FscsError):
        select_labelled(idx, classes, 0.0, seed=0)


def test_resize_and_targets():
    gt = np.zeros((4, 6), np.uint8)
    gt[:, 3:] = 2
    gt[:2] = 255  # pixel centres of a 2x2 resize sample rows 1 and 3, columns 1 and 4
    assert nearest(gt, 2).tolist() == [[255, 255], [0, 2]]
    t = binary_target(gt, 2, 4)
    assert t.dtype == np.uint8 and set(np.unique(t)) == {0, 1, 255}


def toy_problem(n=48, seed=0, g=8):
    """Blocks marked +0.8 by head 0 and -0.8 by head 1 over noise: the head mean cannot see them."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5, 0.5, (n, 6, g, g)).astype(np.float32)
    fg = np.zeros((n, g, g), bool)
    for i in range(n):
        r0, c0 = rng.integers(0, g - 3, 2)
        h, w = rng.integers(2, g // 2 + 2, 2)
        fg[i, r0 : r0 + h, c0 : c0 + w] = True
    x[:, 0] += np.where(fg, 0.8, -0.8)
    x[:, 1] -= np.where(fg, 0.8, -0.8)
    y = np.repeat(np.repeat(fg, 2, axis=1), 2, axis=2).astype(np.uint8)  # label size 16 = 2x grid
    y[:, 0, :] = 255  # a void row
    return x, y


def _iou(prob, y):
    pred = np.repeat(np.repeat(prob >= 0.5, 2, axis=1), 2, axis=2)
    valid = y != 255
    return (pred & (y == 1) & valid).sum() / ((pred | (y == 1)) & valid).sum()


def test_enhancer_learns_toy_mapping():
    from fscs.pseudo.attention import cst_foreground

    torch.set_num_threads(1)
    x, y = toy_problem()
    cfg = {"steps": 100, "batch_size": 16, "lr": 3e-3, "width": 32, "seed": 0}
    model, hist = train_enhancer(x, y, cfg)
    assert hist[-1] < 0.2 * hist[0]
    xt, yt = toy_problem(seed=1)
    prob = enhance(model, xt)
    assert prob.shape == (len(xt), 8, 8) and prob.dtype == np.float32
    assert _iou(prob, yt) > 0.9
    assert _iou(cst_foreground(xt.transpose(1, 0, 2, 3)), yt) < 0.5  # the raw recipe cannot
    assert model.threshold in DEFAULT_CONFIG["threshold_grid"]  # calibrated on the training samples
    fixed, _ = train_enhancer(x, y, {**cfg, "steps": 2, "threshold": 0.3})
    assert fixed.threshold == 0.3
    # deterministic: the same seed gives the same weights
    model2, _ = train_enhancer(x, y, cfg)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_enhancer_architecture_and_checkpoint(tmp_path):
    m = Enhancer(6, 128)
    assert sum(p.numel() for p in m.parameters()) == 6 * 128 * 9 + 128 + 128 * 128 * 9 + 128 + 128 * 9 + 1
    assert m(torch.zeros(2, 6, 5, 7)).shape == (2, 1, 5, 7)
    path = tmp_path / "e.pt"
    m.threshold = 0.35
    save_enhancer(path, {"fold0": m, "fold1": Enhancer(6, 128)}, {"in_channels": 6, "width": 128})
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"state_dict", "config"}
    back = load_enhancer(path, fold=0)
    assert back.threshold == 0.35 and load_enhancer(path, fold=1).threshold == 0.5
    for a, b in zip(m.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(FscsError, match="fold 3"):
        load_enhancer(path, fold=3)
    with pytest.raises(FscsError, match="not found"):
        load_enhancer(tmp_path / "none.pt")


def test_enhancer_stage(tiny_world):  # noqa: F811
    from fscs.features.store import FeatureStore
    from fscs.pseudo.attention import Labeler
    from stages import enhancer as stage
    from stages import pseudo as pstage

    w = tiny_world
    common = ["--params", str(w.params), "--index", str(w.index), "--folds", str(w.folds)]
    pseudo = w.tmp / "pseudo.h5"
    pstage.main(
        [
            *common,
            "--features",
            str(w.store),
            "--out",
            str(pseudo),
            "--report",
            str(w.tmp / "p.json"),
            "--plot",
            str(w.tmp / "p.csv"),
        ]
    )
    model, out, report, figs = w.tmp / "e.pt", w.tmp / "enh.h5", w.tmp / "e.json", w.tmp / "figs"
    argv = [
        *common,
        "--features",
        str(w.store),
        "--pseudo",
        str(pseudo),
        "--model",
        str(model),
        "--out",
        str(out),
        "--report",
        str(report),
        "--figures",
        str(figs),
    ]
    stage.main(argv)
    rep = json.loads(report.read_text())
    assert rep["per_fold"] and rep["fraction"] == 0.25
    for kind in ("self", "pair"):
        assert 0 <= rep[kind]["before"] <= 100 and 0 <= rep[kind]["after"] <= 100
    assert [r["fraction"] for r in rep["sweep"]] == [0.25]
    labelled = read_labelled_ids(out)
    assert len(labelled) == rep["labelled"] >= 1
    ids, enh = read_enhanced(out, fold=1)
    assert enh.shape == (len(ids), 4, 4) and enh.dtype == np.float16
    assert (figs / "pseudo_labels.png").is_file()
    with FeatureStore(w.store) as store:
        lab = Labeler(store, enhancer=model, fold=1)
        fg = lab.support_fg(ids[0])
        np.testing.assert_allclose(fg, enh[0].astype(np.float32), atol=2e-3)
        ckpt = torch.load(model, weights_only=True)
        assert (
            lab.mask_threshold
            == ckpt["config"]["thresholds"]["fold1"]
            == rep["threshold"]["enhanced"]["fold1"]
        )
        assert lab.pair_fg(ids[0], ids[1]).shape == (4, 4)
    # same params, same outputs (seeded, deterministic)
    first = model.read_bytes()
    stage.main(argv)
    a, b = torch.load(model, weights_only=True), torch.load(w.tmp / "e.pt", weights_only=True)
    assert first and all(
        torch.equal(a["state_dict"]["fold0"][k], b["state_dict"]["fold0"][k])
        for k in a["state_dict"]["fold0"]
    )


def test_enhancer_refuses_self_maps_not_made_from_the_store(tiny_world):  # noqa: F811
    """The stage's input check: other centring, another image list or grid -> FscsError naming the file."""
    from fscs.features.store import FeatureStore
    from fscs.pseudo.attention import head_cosine, write_self_maps
    from fscs.pseudo.enhancer_study import load_checked_self_maps

    w = tiny_world
    with FeatureStore(w.store) as store:
        ids = list(store.image_ids)
        maps = np.stack([head_cosine(store.cls_query(i), store.patch_keys(i), True) for i in ids])
        maps = maps.reshape(len(ids), -1, *store.grid)
        good = w.tmp / "good.h5"
        write_self_maps(good, ids, maps, {"center_keys": True})
        got_ids, got = load_checked_self_maps(str(good), store, True, "store.h5")
        assert got_ids == ids and got.shape == maps.shape
        with pytest.raises(FscsError, match="good.h5: made with other pseudo.center_keys"):
            load_checked_self_maps(str(good), store, False, "store.h5")
        short = w.tmp / "short.h5"
        write_self_maps(short, ids[:-1], maps[:-1], {"center_keys": True})
        with pytest.raises(FscsError, match="short.h5: image list or grid differs from store.h5"):
            load_checked_self_maps(str(short), store, True, "store.h5")
