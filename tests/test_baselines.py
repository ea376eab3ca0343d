"""Training-free baselines on a tiny synthetic store where the features separate classes perfectly."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fscs.core.errors import FscsError
from fscs.evaluation.baselines import (
    AttentionBaseline,
    PrototypeBaseline,
    gt_cell_fraction,
    layer_position,
    presence_score,
    run_baselines,
)
from fscs.evaluation.episodes import run_episodes
from fscs.learn.calibration import best_threshold
from fscs.pseudo.attention import Labeler

GRID = (4, 4)
SIZE = 8  # 8x8 masks: one token cell = 2x2 pixels
HEADS, HEAD_DIM = 2, 6
D = 8


class FakeStore:
    """Per image: tokens (L=2, 1+P, D), cls_query (H, d), patch_keys (H, P, d); records what is read."""

    def __init__(self, masks, classes):
        self.attrs = {"layers": [0, 1], "depth": 2, "grid": list(GRID), "num_heads": HEADS}
        self.grid = GRID
        self.num_heads = HEADS
        self.masks, self.classes = masks, classes
        self.reads = []

    def _cells(self, iid):
        return self.masks[iid][::2, ::2].reshape(-1)  # class per token cell

    def tokens(self, iid):
        self.reads.append(iid)
        cells = self._cells(iid)
        t = np.zeros((2, 1 + cells.size, D), np.float32)
        for p, c in enumerate(cells):
            t[:, 1 + p, c] = 1.0  # class c -> axis c, background -> axis 0
        t[:, 0, self.classes[iid]] = 1.0
        return t.astype(np.float16)

    def cls_query(self, iid):
        self.reads.append(iid)
        q = np.zeros((HEADS, HEAD_DIM), np.float32)
        q[:, self.classes[iid] - 1] = 1.0
        return q.astype(np.float16)

    def patch_keys(self, iid):
        self.reads.append(iid)
        cells = self._cells(iid)
        k = np.zeros((HEADS, cells.size, HEAD_DIM), np.float32)
        for p, c in enumerate(cells):
            if c:
                k[:, p, c - 1] = 1.0
            else:
                k[:, p, :4] = -0.5  # background: cosine -0.5 with every class query
        return k.astype(np.float16)


@pytest.fixture
def world(tmp_path):
    masks, classes, rows = {}, {}, []
    for c in (1, 2, 3, 4):
        for j in range(3):
            m = np.zeros((SIZE, SIZE), np.uint8)
            r0, c0 = 2 * (j % 2), 2 * j
            m[r0 : r0 + 4, c0 : c0 + 2 + 2 * (j == 0)] = c
            m[SIZE - 1, 0] = 255 if j == 1 else m[SIZE - 1, 0]
            iid = f"c{c}_{j}"
            masks[iid], classes[iid] = m, c
            path = tmp_path / f"{iid}.png"
            Image.fromarray(m, mode="L").save(path)
            rows.append(
                dict(
                    image_id=iid,
                    split="val" if c <= 2 else "train",
                    image_path=str(path),
                    mask_path=str(path),
                    height=SIZE,
                    width=SIZE,
                    classes=[c],
                )
            )
    index = pd.DataFrame(rows).set_index("image_id", drop=False).rename_axis(None)
    folds = {
        "classes": {str(c): f"k{c}" for c in range(1, 5)},
        "folds": {"0": {"test": [1, 2], "train": [3, 4]}},
    }
    return FakeStore(masks, classes), index, folds, masks


def _support_ids(q, shot):
    return lambda c: [f"c{c}_{(q + 1 + k) % 3}" for k in range(shot)]


def _episodes(cls_pair, shots=(1,)):
    a, b = cls_pair
    rows, e = [], 0
    for shot in shots:
        for q in range(3):
            for qc in (a, b):
                query = f"c{qc}_{q}"
                sup = _support_ids(q, shot)
                for c in (a, b):  # 1-way: present and absent
                    rows.append(
                        dict(
                            fold=0,
                            episode=e,
                            way=1,
                            shot=shot,
                            query_id=query,
                            support_classes=[c],
                            support_ids=[sup(c)],
                            labels=[int(c == qc)],
                        )
                    )
                    e += 1
                rows.append(
                    dict(
                        fold=0,
                        episode=e,
                        way=2,
                        shot=shot,
                        query_id=query,
                        support_classes=[b, a],
                        support_ids=[sup(b), sup(a)],
                        labels=[int(b == qc), int(a == qc)],
                    )
                )
                e += 1
    return pd.DataFrame(rows)


def test_presence_score_and_best_threshold():
    m = np.arange(20, dtype=np.float32).reshape(4, 5) / 20
    assert presence_score(m, "max") == pytest.approx(0.95)
    assert presence_score(m, "mean") == pytest.approx(0.475)
    assert presence_score(m, "top10") == pytest.approx((0.95 + 0.9) / 2)
    with pytest.raises(FscsError):
        presence_score(m, "median")
    # sorted: .1(neg) .3(pos) .4(neg) .6 .7(pos): t=.2 and t=.5 both give 4/5; ties go to the lowest
    t, acc = best_threshold(np.array([0.1, 0.4, 0.6, 0.7, 0.3]), np.array([0, 0, 1, 1, 1]))
    assert acc == pytest.approx(0.8) and t == pytest.approx(0.2)
    t, acc = best_threshold(np.array([0.1, 0.2, 0.6, 0.7]), np.array([0, 0, 1, 1]))
    assert acc == 1.0 and t == pytest.approx(0.4)
    t, acc = best_threshold(np.array([0.5, 0.5]), np.array([1, 1]))
    assert acc == 1.0 and t < 0.5


def test_gt_cell_fraction_and_layer_position(world):
    store, *_ = world
    m = np.zeros((4, 6), np.uint8)
    m[:2, :3] = 7
    np.testing.assert_allclose(gt_cell_fraction(m, 7, (2, 2)), [[1, 0], [0, 0]])
    assert layer_position(store, -1) == 1 and layer_position(store, 0) == 0
    with pytest.raises(FscsError, match="not in the feature store"):
        layer_position(store, 5)


@pytest.mark.parametrize("kind", ["attention", "prototype", "prototype_gt"])
def test_baselines_are_perfect_on_separable_features_and_calibrate_on_val_only(world, kind):
    store, index, folds, masks = world
    val = _episodes((3, 4), shots=(1, 2))
    test = _episodes((1, 2), shots=(1, 2))
    labeler = Labeler(store, threshold=0.4)
    if kind == "attention":
        b = AttentionBaseline(store)
    else:
        b = PrototypeBaseline(store, labeler=labeler, index=index, support_mask=kind[10:] or "pseudo")
    store.reads.clear()
    cal = b.calibrate(val, index, [3, 4], progress=False)
    assert {i[:2] for i in store.reads} <= {"c3", "c4"}  # only validation images were touched
    assert set(cal) == {"all", "1way1shot", "2way1shot", "1way2shot", "2way2shot"}
    assert all(r["val_presence_acc"] == 100.0 for r in cal.values())
    res = run_episodes(test, b, index, [1, 2], progress=False)
    for r in res.values():
        assert r["er"] == 100.0 and r["miou"] == 100.0
    # deterministic
    b2 = AttentionBaseline(store) if kind == "attention" else b
    assert b2.calibrate(val, index, [3, 4], progress=False) == cal


def test_uncalibrated_and_bad_config(world):
    store, index, *_ = world
    with pytest.raises(FscsError, match="not calibrated"):
        AttentionBaseline(store).predict("c1_0", [1], [["c1_1"]])
    with pytest.raises(FscsError):
        PrototypeBaseline(store, support_mask="gt")
    with pytest.raises(FscsError):
        AttentionBaseline(store, stats=["median"])


def test_run_baselines_file(world):
    store, index, folds, _ = world
    out = run_baselines(
        ["attention", "prototype", "prototype_gt"],
        0,
        _episodes((1, 2)),
        _episodes((3, 4)),
        index,
        folds,
        store,
        Labeler(store),
        progress=False,
    )
    assert out["fold"] == 0 and out["void"] == "ignore"
    assert set(out["baselines"]) == {"attention", "prototype", "prototype_gt"}
    assert out["baselines"]["prototype_gt"]["1way1shot"] == {
        "er": 100.0,
        "miou": 100.0,
        "fbiou": 100.0,
        "episodes": 12,
    }
    assert out["calibration"]["prototype"]["supervision"] == "image"
    assert out["calibration"]["prototype_gt"]["supervision"] == "pixel"
    json.dumps(out, allow_nan=False)
    with pytest.raises(FscsError, match="test classes"):
        run_baselines(
            ["attention"], 0, _episodes((1, 2)), _episodes((1, 3)), index, folds, store, None, progress=False
        )


def test_stage_on_tiny_voc(voc_fixture, tmp_path):
    """prepare -> tiny-ViT store -> pseudo file -> `python -m stages.baselines` main; errors before output."""
    import yaml

    from fscs.core.provenance import recorded
    from fscs.data.index import read_index
    from fscs.features.backbone import create_backbone
    from fscs.features.extraction import extract_to_store
    from fscs.features.store import FeatureStore
    from fscs.pseudo.attention import head_cosine, write_self_maps
    from stages import baselines as stage
    from stages import prepare

    params = dict(voc_fixture.params)
    params["episodes"] = {**params["episodes"], "test_per_fold": 3, "val_per_fold": 3, "shots": [1]}
    params["backbone"] = {"name": "vit_tiny_random", "input_size": 32, "layers": "all"}
    params["pseudo"] = {"recipe": "cst", "cst_threshold": 0.4, "center_keys": True}
    params["evaluate"] = {"void": "ignore", "baselines": {"layer": -1}}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    idx, eps = tmp_path / "index.parquet", tmp_path / "episodes"
    prepare.main(["--params", str(pfile), "--index", str(idx), "--episodes", str(eps)])
    index = read_index(idx)
    feats = tmp_path / "features.h5"
    extract_to_store(
        create_backbone("vit_tiny_random", 32),
        list(index.index),
        list(index["image_path"]),
        feats,
        progress=False,
    )
    with FeatureStore(feats) as store:
        ids = store.image_ids
        maps = np.stack(
            [head_cosine(store.cls_query(i), store.patch_keys(i), True).reshape(-1, *store.grid) for i in ids]
        )
        attrs = {"recipe": "cst", "center_keys": True, **recorded(store.attrs)}
        write_self_maps(tmp_path / "pseudo.h5", ids, maps, attrs)
    out = tmp_path / "out" / "fold0.json"
    args = [
        "--params",
        str(pfile),
        "--fold",
        "0",
        "--index",
        str(idx),
        "--folds",
        str(eps / "folds.json"),
        "--episodes",
        str(eps),
        "--features",
        str(feats),
        "--pseudo",
        str(tmp_path / "pseudo.h5"),
        "--out",
        str(out),
        "--quiet",
    ]
    stage.main(args)
    doc = json.loads(out.read_text())
    assert set(doc["baselines"]) == {"attention", "prototype", "prototype_gt"}
    for res in doc["baselines"].values():
        assert set(res) == {"1way1shot", "2way1shot"}
        for r in res.values():
            assert r["episodes"] == 3 and 0 <= r["er"] <= 100 and 0 <= r["miou"] <= 100
    # bad params: error before any output
    out.unlink()
    params["evaluate"]["baselines"] = {"layer": 7}
    pfile.write_text(yaml.safe_dump(params))
    with pytest.raises(FscsError, match="block 7"):
        stage.main(args)
    params["evaluate"] = {"void": "nope"}
    pfile.write_text(yaml.safe_dump(params))
    with pytest.raises(FscsError, match="evaluate.void"):
        stage.main(args)
    assert not out.exists()


def test_gt_cell_fraction_matches_adaptive_pooling():
    import torch
    import torch.nn.functional as F

    m = np.random.default_rng(0).integers(0, 3, (37, 51))
    ref = F.adaptive_avg_pool2d(torch.from_numpy((m == 1).astype(np.float32))[None, None], (5, 7))[
        0, 0
    ].numpy()
    np.testing.assert_allclose(gt_cell_fraction(m, 1, (5, 7)), ref, atol=1e-6)


def test_stuff_classes_get_the_complement_of_the_image_level_maps(world):
    """pseudo.stuff_masks: complement -> the attention map and the prototype's pseudo support weights of a
    stuff class are the complements; other classes and the GT prototype are unchanged."""
    store, index, folds, masks = world
    labeler = Labeler(store, threshold=0.4)
    plain, stuffed = AttentionBaseline(store), AttentionBaseline(store, complement={1})
    raw = plain.raw_map("c1_0", 1, ["c1_1"])
    np.testing.assert_allclose(stuffed.raw_map("c1_0", 1, ["c1_1"]), 1.0 - raw, atol=1e-6)
    np.testing.assert_array_equal(stuffed.raw_map("c2_0", 2, ["c2_1"]), plain.raw_map("c2_0", 2, ["c2_1"]))
    proto = PrototypeBaseline(store, labeler=labeler, index=index, complement={1})
    base = PrototypeBaseline(store, labeler=labeler, index=index)
    np.testing.assert_array_equal(proto.weights("c1_1", 1), 1.0 - base.weights("c1_1", 1))
    np.testing.assert_array_equal(proto.weights("c2_1", 2), base.weights("c2_1", 2))
    gt = PrototypeBaseline(store, index=index, support_mask="gt", complement={1})
    assert gt.complement == set()
