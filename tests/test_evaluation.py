"""run_episodes on tiny fake data: an oracle predictor scores 100, an all-background one scores 0."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fscs.core.errors import FscsError
from fscs.core.lru import LRUCache
from fscs.core.resample import bilinear_gather
from fscs.evaluation.episodes import decide, evaluation_json, load_episodes, run_episodes

H, W = 6, 8


def _mask(classes_boxes):
    m = np.zeros((H, W), np.uint8)
    for c, (r0, r1, c0, c1) in classes_boxes:
        m[r0:r1, c0:c1] = c
    m[0, 0] = 255  # a void pixel
    return m


@pytest.fixture
def fake(tmp_path):
    masks = {
        "q1": _mask([(1, (1, 4, 1, 5))]),
        "q2": _mask([(2, (2, 6, 0, 4)), (3, (0, 2, 5, 8))]),
        "q3": _mask([(3, (3, 6, 3, 8))]),
    }
    rows = []
    for iid, m in masks.items():
        path = tmp_path / f"{iid}.png"
        Image.fromarray(m, mode="L").save(path)
        rows.append(
            dict(
                image_id=iid,
                split="val",
                image_path=str(path),
                mask_path=str(path),
                height=H,
                width=W,
                classes=sorted(int(c) for c in np.unique(m) if c not in (0, 255)),
            )
        )
    index = pd.DataFrame(rows).set_index("image_id")
    eps = pd.DataFrame(
        [
            dict(
                fold=0,
                episode=0,
                way=1,
                shot=1,
                query_id="q1",
                support_classes=[1],
                support_ids=[["s"]],
                labels=[1],
            ),
            dict(
                fold=0,
                episode=1,
                way=1,
                shot=1,
                query_id="q2",
                support_classes=[1],
                support_ids=[["s"]],
                labels=[0],
            ),
            dict(
                fold=0,
                episode=0,
                way=2,
                shot=1,
                query_id="q2",
                support_classes=[3, 2],
                support_ids=[["s"], ["t"]],
                labels=[1, 1],
            ),
            dict(
                fold=0,
                episode=1,
                way=2,
                shot=1,
                query_id="q3",
                support_classes=[1, 3],
                support_ids=[["s"], ["t"]],
                labels=[0, 1],
            ),
        ]
    )
    return index, eps, masks


class Oracle:
    """Returns the ground truth at half resolution-free full size (no resize needed)."""

    def __init__(self, masks):
        self.masks = masks
        self.calls = []

    def predict(self, query_id, support_classes, support_ids):
        self.calls.append(query_id)
        m = self.masks[query_id]
        fg = np.stack([(m == c).astype(np.float32) for c in support_classes])
        return fg.reshape(len(support_classes), -1).max(1), fg


class AllBackground:
    def predict(self, query_id, support_classes, support_ids):
        n = len(support_classes)
        return np.zeros(n), np.zeros((n, 3, 4), np.float32)


def test_oracle_scores_100(fake):
    index, eps, masks = fake
    res = run_episodes(eps, Oracle(masks), index, [1, 2, 3], progress=False)
    assert list(res) == ["1way1shot", "2way1shot"]
    for r in res.values():
        assert r["er"] == 100.0 and r["miou"] == 100.0 and r["fbiou"] == 100.0 and r["episodes"] == 2
    # 1-way: class 2 and 3 never in an episode -> undefined
    assert res["1way1shot"]["per_class_iou"] == {"1": 100.0, "2": None, "3": None}


def test_all_background(fake):
    index, eps, masks = fake
    res = run_episodes(eps, AllBackground(), index, [1, 2, 3], progress=False)
    r1 = res["1way1shot"]
    # episode 0 (class 1 present) wrong, episode 1 (class 1 absent) right
    assert r1["er"] == 50.0
    assert r1["miou"] == 0.0
    # bg IoU: valid pixels in both queries; all predicted bg. q1: 47 valid, 12 fg -> bg I=35, U=47;
    # q2: class 1 absent -> whole image gt bg: I=U=47. fg IoU = 0/12.
    assert r1["fbiou"] == pytest.approx(round((100 * 82 / 94 + 0) / 2, 4))
    assert res["2way1shot"]["er"] == 0.0


def test_upsampling_and_decision_rules():
    # 2 classes on a 2x2 grid upsampled to 4x4; class 2 wins where both >= .5
    fg = np.array([[[0.9, 0.2], [0.6, 0.1]], [[0.95, 0.3], [0.4, 0.45]]], np.float32)
    present, lab = decide(np.array([0.5, 0.51]), fg, (2, 2))
    np.testing.assert_array_equal(present, [False, True])
    np.testing.assert_array_equal(lab, [[2, 0], [1, 0]])
    up = bilinear_gather(fg, (4, 4))
    assert up.shape == (2, 4, 4) and up[0, 0, 0] == pytest.approx(0.9)


def test_predictor_sees_every_episode_and_gt_resized(fake):
    index, eps, masks = fake

    class Coarse(Oracle):
        def predict(self, q, c, s):
            p, fg = super().predict(q, c, s)
            return p, fg[:, ::2, ::2]  # half resolution: still upsampled to the original size

    o = Coarse(masks)
    res = run_episodes(eps, o, index, [1, 2, 3], progress=False)
    assert o.calls == ["q1", "q2", "q2", "q3"]
    assert res["1way1shot"]["er"] == 100.0 and 0 < res["1way1shot"]["miou"] <= 100.0


def test_errors(fake, tmp_path):
    index, eps, masks = fake

    class Wrong:
        def predict(self, q, c, s):
            return np.zeros(3), np.zeros((3, 2, 2))

    with pytest.raises(FscsError, match="predictor returned"):
        run_episodes(eps, Wrong(), index, [1], progress=False)
    bad = eps.copy()
    bad.loc[0, "query_id"] = "nope"
    with pytest.raises(FscsError, match="nope"):
        run_episodes(bad, Oracle(masks), index, [1], progress=False)
    with pytest.raises(FscsError, match="not found"):
        load_episodes(tmp_path / "missing.parquet")
    eps.to_parquet(tmp_path / "e.parquet")
    assert len(load_episodes(tmp_path / "e.parquet", fold=0)) == 4
    with pytest.raises(FscsError, match="no episodes for fold 3"):
        load_episodes(tmp_path / "e.parquet", fold=3)


def test_evaluation_json_shape(fake):
    index, eps, masks = fake
    res = run_episodes(eps, Oracle(masks), index, [1, 2, 3], progress=False)
    out = evaluation_json(0, "pixel", "ignore", res)
    assert out["fold"] == 0 and out["supervision"] == "pixel" and out["void"] == "ignore"
    assert out["results"]["2way1shot"] == {"er": 100.0, "miou": 100.0, "fbiou": 100.0, "episodes": 2}
    assert out["per_class_iou"]["1way1shot"]["1"] == 100.0
    json.dumps(out, allow_nan=False)


def test_mask_cache_is_reused(fake):
    index, eps, masks = fake
    cache = LRUCache()
    run_episodes(eps, Oracle(masks), index, [1, 2, 3], progress=False, mask_cache=cache)
    assert set(cache) == {"q1", "q2", "q3"}
    cache["q1"] = np.zeros((H, W), np.uint8)  # a cached mask is used as is
    res = run_episodes(eps, Oracle(masks), index, [1, 2, 3], progress=False, mask_cache=cache)
    assert res["1way1shot"]["er"] == 100.0 and res["1way1shot"]["miou"] < 100.0
