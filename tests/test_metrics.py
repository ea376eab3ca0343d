"""Hand-computed cases for ER, accumulated class-wise IoU and FB-IoU."""

import math

import numpy as np
import pytest

from fscs.evaluation.metrics import ClsMeter, SegMeter, episode_gt


def test_episode_gt_maps_other_classes_to_background_and_keeps_void():
    gt = np.array([[3, 5, 7], [0, 255, 5]], dtype=np.uint8)
    np.testing.assert_array_equal(episode_gt(gt, [5, 3]), [[2, 1, 0], [0, 255, 1]])
    np.testing.assert_array_equal(episode_gt(gt, [5, 3], void="background"), [[2, 1, 0], [0, 0, 1]])


def test_one_way_single_episode():
    # class 4; gt: 4 pixels of class 4 in the left two columns; pred marks 3 of them plus 1 background pixel
    gt = np.array([[4, 4, 0], [4, 4, 0]], dtype=np.uint8)
    pred = np.array([[1, 1, 1], [1, 0, 0]], dtype=np.uint8)
    m = SegMeter([4, 9])
    m.update(pred, gt, [4])
    # class 4: I = 3, U = 5 -> 60; background: I = 1, U = 3 -> 33.33
    assert m.iou(4) == pytest.approx(60.0)
    assert m.iou(0) == pytest.approx(100 / 3)
    # class 9 never appeared: excluded from mIoU, reported None
    assert m.per_class() == {4: pytest.approx(60.0), 9: None}
    assert m.miou() == pytest.approx(60.0)
    assert m.fbiou() == pytest.approx((60.0 + 100 / 3) / 2)


def test_void_ignore_vs_background():
    gt = np.array([[4, 255, 0, 0]], dtype=np.uint8)
    pred = np.array([[1, 1, 0, 1]], dtype=np.uint8)
    ign = SegMeter([4], void="ignore")
    ign.update(pred, gt, [4])
    # ignore: valid pixels 0, 2, 3 -> class 4: I=1, U=2 ; bg: I=1, U=2
    assert ign.iou(4) == pytest.approx(50.0)
    assert ign.iou(0) == pytest.approx(50.0)
    bgm = SegMeter([4], void="background")
    bgm.update(pred, gt, [4])
    # void as background: gt = [4,0,0,0]; class 4: I=1, U=3 ; bg: I=1 (px 2), U=3
    assert bgm.iou(4) == pytest.approx(100 / 3)
    assert bgm.iou(0) == pytest.approx(100 / 3)
    assert bgm.fbiou() == pytest.approx(100 / 3)


def test_two_way_maps_episode_labels_to_absolute_classes_and_fb():
    # episode classes [7, 2]: label 1 -> class 7, label 2 -> class 2; class 5 is not in the episode -> bg
    gt = np.array([[7, 7, 2, 2, 5, 0]], dtype=np.uint8)
    pred = np.array([[1, 2, 2, 0, 0, 1]], dtype=np.uint8)
    m = SegMeter([2, 7])
    m.update(pred, gt, [7, 2])
    # class 7: gt {0,1}, pred {0,5}: I=1, U=3 ; class 2: gt {2,3}, pred {1,2}: I=1, U=3
    # bg: gt {4,5}, pred {3,4}: I=1, U=3
    assert m.iou(7) == pytest.approx(100 / 3)
    assert m.iou(2) == pytest.approx(100 / 3)
    assert m.iou(0) == pytest.approx(100 / 3)
    assert m.miou() == pytest.approx(100 / 3)
    # fg: gt {0,1,2,3}, pred {0,1,2,5}: I=3 (pixel 1 counts though its class is wrong), U=5 -> 60
    assert m.fbiou() == pytest.approx((60.0 + 100 / 3) / 2)


def test_accumulation_differs_from_per_episode_average():
    m = SegMeter([1])
    # episode A: big object, I=9, U=10 (90%)
    gt_a = np.array([[1] * 10], dtype=np.uint8)
    pred_a = np.array([[1] * 9 + [0]], dtype=np.uint8)
    m.update(pred_a, gt_a, [1])
    # episode B: small object missed entirely: I=0, U=1 (0%)
    gt_b = np.array([[1, 0, 0]], dtype=np.uint8)
    pred_b = np.zeros((1, 3), dtype=np.uint8)
    m.update(pred_b, gt_b, [1])
    assert m.iou(1) == pytest.approx(100 * 9 / 11)  # not (90 + 0) / 2 = 45
    assert m.episodes == 2


def test_class_absent_from_query_only_false_positives_count():
    m = SegMeter([3, 6])
    gt = np.array([[0, 0, 3, 3]], dtype=np.uint8)
    # 2-way with class 6 absent; predicted class 6 on one pixel
    pred = np.array([[2, 0, 1, 1]], dtype=np.uint8)
    m.update(pred, gt, [3, 6])
    assert m.iou(3) == pytest.approx(100.0)
    assert m.iou(6) == pytest.approx(0.0)  # union 1 (the false positive), intersection 0
    assert m.miou() == pytest.approx(50.0)
    # a correctly-empty absent class adds zero union: IoU stays undefined
    m2 = SegMeter([3, 6])
    m2.update(np.array([[0, 0, 1, 1]], dtype=np.uint8), gt, [3, 6])
    assert m2.per_class() == {3: pytest.approx(100.0), 6: None}
    assert m2.miou() == pytest.approx(100.0)


def test_empty_meter_and_bad_input():
    m = SegMeter([1])
    assert math.isnan(m.miou()) and math.isnan(m.fbiou())
    with pytest.raises(ValueError):
        m.update(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), [1])
    with pytest.raises(ValueError):
        m.update(np.full((2, 2), 2, np.uint8), np.zeros((2, 2), np.uint8), [1])
    with pytest.raises(ValueError):
        SegMeter([1], void="other")


def test_exact_ratio():
    c = ClsMeter()
    assert math.isnan(c.er())
    c.update([True, False], [1, 0])  # right
    c.update([True, True], [1, 0])  # one wrong -> episode wrong
    c.update([False], [0])  # right
    c.update(np.array([0.0]), [1])  # wrong
    assert c.er() == pytest.approx(50.0)
    with pytest.raises(ValueError):
        c.update([True], [1, 0])


def test_threshold_sweep_matches_segmeter():
    from fscs.evaluation.metrics import ThresholdSweep

    rng = np.random.default_rng(0)
    ts = [0.0, 0.3, 0.5, 0.51, 0.9, 1.1]
    sweep = ThresholdSweep([1, 2, 3], ts, void="ignore")
    meters = [SegMeter([1, 2, 3], void="ignore") for _ in ts]
    for classes in ([1], [2, 3], [3, 1]):
        gt = rng.choice([0, 1, 2, 3, 255], size=(7, 9)).astype(np.uint8)
        top = np.round(rng.random((7, 9)), 2)
        arg = rng.integers(1, len(classes) + 1, size=(7, 9))
        sweep.update(top, arg, gt, classes)
        for t, m in zip(ts, meters, strict=True):
            m.update(np.where(top >= t, arg, 0), gt, classes)
    np.testing.assert_allclose(sweep.miou(), [m.miou() for m in meters])
