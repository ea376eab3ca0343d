"""The joint K-shot rule: one attention over all K supports' positions, each masked by its own support."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from test_model import FakeStore, tiny_config, tokens

from fscs.learn.model import CST
from fscs.learn.model.prior import prepare_prior, prototype_prior
from fscs.learn.predictor import CSTPredictor, TokenBank


def _masks(k: int, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    m = np.zeros((k, 16, 16), dtype=bool)
    for i in range(k):
        r, c = g.integers(0, 8, 2)
        m[i, r : r + 8, c : c + 8] = True
    return torch.from_numpy(m)


def _joint(model: CST, q: torch.Tensor, s: torch.Tensor, masks: torch.Tensor, shots: int):
    with torch.no_grad():
        return model.forward_prepared(model.prepare_query(q), model.prepare_support(s), masks, None, shots)


@pytest.mark.parametrize("prior", ["none", "prototype"])
def test_joint_shots_are_a_set_and_copies_of_one_support_are_that_support(prior):
    """Permuting the K supports changes nothing, and K copies of one support give its 1-shot prediction:
    the attention weights over K identical key sets are that set's, spread evenly."""
    torch.manual_seed(0)
    model = CST(tiny_config(prior=prior)).eval()
    q, s, masks = tokens(1), tokens(3, 1), _masks(3)

    def run(support, mask, shots):
        with torch.no_grad():
            prepared = (model.prepare_query(q), model.prepare_support(support))
            p = (model.prepare_prior(q), model.prepare_prior(support)) if model.uses_prior else None
            return model.forward_prepared(*prepared, mask, p, shots)

    order = torch.tensor([2, 0, 1])
    for a, b in zip(run(s, masks, 3), run(s[order], masks[order], 3), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    one = run(s[:1], masks[:1], 1)
    copies = run(s[:1].expand(3, -1, -1, -1), masks[:1].expand(3, -1, -1), 3)
    for a, b in zip(one, copies, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_joint_groups_in_a_batch_equal_each_group_alone_and_each_shot_counts():
    """Two queries' groups of 3 shots in one batch give what each group gives alone; a shot's mask reaches
    the result (an empty-masked shot differs from a masked one), so no shot is dropped or swapped."""
    torch.manual_seed(0)
    model = CST(tiny_config()).eval()
    q, s, masks = tokens(2), tokens(6, 1), _masks(6)
    cls, seg = _joint(model, q, s, masks, 3)
    assert cls.shape == (2, 2) and seg.shape[0] == 2
    for g in range(2):
        alone = _joint(model, q[g : g + 1], s[3 * g : 3 * g + 3], masks[3 * g : 3 * g + 3], 3)
        torch.testing.assert_close(cls[g : g + 1], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seg[g : g + 1], alone[1], atol=1e-5, rtol=1e-5)
    emptied = masks.clone()
    emptied[2] = False
    assert not torch.allclose(_joint(model, q, s, emptied, 3)[1][0], seg[0])
    torch.testing.assert_close(_joint(model, q, s, emptied, 3)[1][1], seg[1])
    with pytest.raises(ValueError, match="groups of 4 shots"):
        _joint(model, q[:1], s, masks, 4)


def test_k_shot_prior_pools_the_supports_into_one_prototype():
    torch.manual_seed(0)
    q, s, masks = tokens(1), tokens(3, 1), _masks(3)
    pq, ps = prepare_prior(q, -1), prepare_prior(s, -1)
    joint = prototype_prior(pq, ps, masks, (4, 4), shots=3)
    w = torch.nn.functional.adaptive_avg_pool2d(masks.float().unsqueeze(1), (4, 4)).flatten(1)
    proto = torch.nn.functional.normalize(torch.einsum("bp,bpd->d", w, ps), dim=0)
    torch.testing.assert_close(joint[0, 0].flatten(), pq[0] @ proto, atol=1e-5, rtol=1e-5)


def _predictor(model: CST, store: FakeStore, batch_size: int = 32) -> CSTPredictor:
    def support_mask(image_id: str, class_id: int) -> np.ndarray:
        m = np.zeros((16, 16), dtype=bool)
        k = int(image_id[-1])
        m[k : k + 8, 2:10] = True
        return m

    return CSTPredictor(
        model, TokenBank(store), support_mask, mask_depends_on_class=False, batch_size=batch_size
    )


def test_joint_predictor_scores_a_class_once_and_one_shot_is_unchanged():
    """Under ``joint`` a class's K shots are one item (counted as K pairs), prefetched or not, in any batch
    size; a 1-shot episode gives bit for bit what the per-pair rules give."""
    torch.manual_seed(0)
    store = FakeStore(n=6)
    model = CST(tiny_config(kshot="joint"))
    per_pair = CST(tiny_config(kshot="mean_logit"))
    per_pair.load_state_dict(model.state_dict())
    joint, pairs = _predictor(model, store), _predictor(per_pair, store)
    for a, b in zip(
        joint.predict("img0", [1], [["img1"]]), pairs.predict("img0", [1], [["img1"]]), strict=True
    ):
        assert np.array_equal(a, b)
    p, fg = joint.predict("img0", [1, 2], [["img1", "img2", "img3"], ["img4", "img5", "img1"]])
    assert p.shape == (2,) and fg.shape == (2, 8, 8)
    assert not np.allclose(fg[0], pairs.predict("img0", [1], [["img1", "img2", "img3"]])[1][0])
    episodes = pd.DataFrame(
        {
            "query_id": ["img0", "img0"],
            "support_classes": [[1, 2], [1]],
            "support_ids": [[["img1", "img2", "img3"], ["img4", "img5", "img1"]], [["img1"]]],
        }
    )
    fresh = _predictor(model, store, batch_size=4)  # one group of 3 per batch
    assert fresh.prefetch(episodes, progress=False) == 7 == fresh.pairs_computed
    p2, fg2 = fresh.predict("img0", [1, 2], [["img1", "img2", "img3"], ["img4", "img5", "img1"]])
    assert fresh.pairs_computed == 7  # read from the cache
    np.testing.assert_allclose(p2, p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fg2, fg, rtol=1e-5, atol=1e-6)


def test_train_shots_are_checked_and_need_the_joint_rule():
    from fscs.config.params import TrainConfig
    from fscs.core.errors import FscsError

    assert TrainConfig.from_params({}).shots == [1]
    assert TrainConfig.from_params({"shots": [1, 5], "model": {"kshot": "joint"}}).shots == [1, 5]
    with pytest.raises(FscsError, match=r"train.shots = \[1, 5\] .* only train.model.kshot: joint"):
        TrainConfig.from_params({"shots": [1, 5], "model": {"kshot": "mean_logit"}})
    for bad in ([], [0], [1.5], 3):
        with pytest.raises(FscsError, match="train.shots must be a non-empty list of counts >= 1"):
            TrainConfig.from_params({"shots": bad, "model": {"kshot": "joint"}})


def test_sweep_overrides_keep_a_list_value_whole():
    from experiments.learner_sweep import parse_overrides

    assert parse_overrides("shots=[1,5],model.kshot=joint,lr=0.01") == {
        "shots": [1, 5],
        "model": {"kshot": "joint"},
        "lr": 0.01,
    }


def test_training_on_several_shot_counts_alternates_them_and_learns_from_each(tmp_path):
    """``shots: [1, 2]`` trains batches of 1 and 2 supports in turn (other weights than 1-shot training from
    the same seed); ``shots: [1]`` is the 1-shot stream, bit for bit, under either K-shot rule."""
    from test_train import run_train, toy_dataset, val_frame

    index, store = toy_dataset(tmp_path, n_per_class=6)
    val = val_frame(index)
    one = run_train(index, store, val, model={"kshot": "mean_logit"})
    same = run_train(index, store, val, model={"kshot": "joint"})
    mixed = run_train(index, store, val, model={"kshot": "joint"}, shots=[1, 2])
    a, b, c = (r.model.state_dict() for r in (one, same, mixed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in c.values() if v.is_floating_point())


def _kshot_frame(index: pd.DataFrame, shots: int) -> pd.DataFrame:
    """1-way ``shots``-shot validation rows of the toy dataset: each image once with its class, once with
    the other."""
    ids = list(index.index)
    of = {c: [i for i in ids if int(index.loc[i, "classes"][0]) == c] for c in (1, 2)}
    rows = []
    for e, q in enumerate(ids):
        c = int(index.loc[q, "classes"][0])
        for k, cls in enumerate((c, 3 - c)):
            pool = [i for i in of[cls] if i != q]
            rows.append(
                {
                    "fold": 0,
                    "episode": 2 * e + k,
                    "way": 1,
                    "shot": shots,
                    "query_id": q,
                    "support_classes": [cls],
                    "support_ids": [[pool[(e + j) % len(pool)] for j in range(shots)]],
                    "labels": [int(cls == c)],
                }
            )
    return pd.DataFrame(rows)


def test_selection_replay_keeps_the_epoch_training_keeps_and_sees_its_weights(tmp_path):
    """`experiments.select_shots` replays the train loop's selection from each epoch's weights (the
    ``on_model`` hook) and validation records: on the 1-shot rule it must keep training's epoch, early stop
    included, and the records must give the curve's calibrated mIoU; a 2-shot list scores too."""
    from test_train import SIZE, model_config, toy_dataset, val_frame

    from experiments.select_shots import choose, rule_choice
    from fscs.config.params import TrainConfig
    from fscs.learn.calibration import calibrate
    from fscs.learn.targets import Targets
    from fscs.learn.train import train, uncalibrated, validation_records

    index, store = toy_dataset(tmp_path, n_per_class=6)
    targets = Targets("pixel", index, SIZE)
    val, kshot = val_frame(index), _kshot_frame(index, 2)
    states = []
    config = TrainConfig(
        seed=0, epochs=5, episodes_per_epoch=16, batch_size=8, label_size=SIZE, patience=1, threads=1,
        calibrate=True, min_epochs=2,
    )  # fmt: skip
    result = train(
        config=config, tokens=TokenBank(store), model_config=model_config(kshot="joint"), targets=targets,
        index=index, train_split="train", train_classes=[1, 2], fold=0, val_episodes=val, progress=False,
        on_model=lambda epoch, m: states.append(copy.deepcopy(m.state_dict())),
    )  # fmt: skip
    assert len(states) == len(result.curve)
    kept = result.model.state_dict()
    assert all(torch.equal(kept[k], states[result.best_epoch - 1][k]) for k in kept)
    records = []
    for row, state in zip(result.curve, states, strict=True):
        model = CST(model_config(kshot="joint"))
        model.load_state_dict(state)
        uncalibrated(model)
        pred = CSTPredictor.for_targets(model, TokenBank(store), targets, 16, 1)
        records.append({k: validation_records(pred, targets, rows) for k, rows in ((1, val), (2, kshot))})
        assert calibrate(records[-1][1], [1, 2])["miou"] == pytest.approx(row["val_miou_cal"], abs=1e-6)
        assert records[-1][2].fg.shape[0] == len(kshot)
    assert rule_choice(records, (1,), [1, 2], config) == result.best_epoch
    assert 1 <= rule_choice(records, (1, 2), [1, 2], config) <= len(records)
    # the replayed early stop: no new best for `patience` epochs ends it, never before `min_epochs`
    assert choose([10.0, 5.0, 20.0], patience=1, min_epochs=1) == 1
    assert choose([10.0, 5.0, 20.0], patience=1, min_epochs=3) == 3
    assert choose([0.0, 0.0, 4.0, 3.0], patience=1, min_epochs=1) == 3  # zeros: the later epoch is kept
