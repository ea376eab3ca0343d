"""CST training: targets per supervision, a toy overfit, determinism, and the train/evaluate stages."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fscs.config.params import PseudoConfig, TrainConfig
from fscs.learn.model import CSTConfig
from fscs.learn.predictor import CSTPredictor, TokenBank
from fscs.learn.targets import Targets
from fscs.learn.train import CURVE_COLUMNS, episode_loss, train

L, H, D, G = 2, 2, 16, (4, 4)
SIZE = 16  # mask / label size: 4 pixels per token


def toy_dataset(tmp_path, n_per_class: int = 6, seed: int = 0):
    """Images of class 1 or 2: a rectangle of tokens near the class prototype, the rest near a per-image
    background vector. Returns (index, store)."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((3, L, D)).astype(np.float32)
    rows, data = [], {}
    for i in range(2 * n_per_class):
        c = 1 + i % 2
        h, w = rng.integers(2, 4, size=2)
        y, x = rng.integers(0, 4 - h + 1), rng.integers(0, 4 - w + 1)
        fg = np.zeros(G, dtype=bool)
        fg[y : y + h, x : x + w] = True
        bg_vec = rng.standard_normal((L, D)).astype(np.float32)
        tok = np.empty((L, 1 + 16, D), dtype=np.float32)
        for p in range(16):
            base = protos[c] if fg.flat[p] else bg_vec
            tok[:, 1 + p] = base + 0.2 * rng.standard_normal((L, D))
        tok[:, 0] = protos[c] + 0.5 * rng.standard_normal((L, D))
        mask = np.kron(fg, np.ones((4, 4), dtype=np.uint8)).astype(np.uint8) * c
        mask[0, 0] = 255  # a void pixel
        path = tmp_path / f"m{i}.png"
        Image.fromarray(mask, mode="L").save(path)
        image_id = f"img{i:02d}"
        data[image_id] = tok.astype(np.float16)
        rows.append(
            {
                "image_id": image_id,
                "split": "train",
                "image_path": "",
                "mask_path": str(path),
                "height": SIZE,
                "width": SIZE,
                "classes": [c],
                "class_pixels": [int((mask == c).sum())],
            }
        )
    index = pd.DataFrame(rows).set_index("image_id", drop=False).rename_axis(None)

    class Store:
        attrs = {"backbone": "toy", "grid": list(G), "num_heads": H, "layers": list(range(L))}

        def tokens(self, image_id):
            return data[image_id]

    return index, Store()


def val_frame(index: pd.DataFrame) -> pd.DataFrame:
    ids = list(index.index)
    rows = []
    for e, q in enumerate(ids):
        c = int(index.loc[q, "classes"][0])
        same = [i for i in ids if i != q and int(index.loc[i, "classes"][0]) == c]
        for k, cls in enumerate((c, 3 - c)):
            pool = same if cls == c else [i for i in ids if int(index.loc[i, "classes"][0]) == cls]
            rows.append(
                {
                    "fold": 0,
                    "episode": 2 * e + k,
                    "way": 1,
                    "shot": 1,
                    "query_id": q,
                    "support_classes": [cls],
                    "support_ids": [[pool[e % len(pool)]]],
                    "labels": [int(cls == c)],
                }
            )
    return pd.DataFrame(rows)


def model_config(**kw) -> CSTConfig:
    return CSTConfig(
        num_layers=L, num_heads=H, embed_dim=D, grid=G, support_size=4, channels=(16, 32), pooled_grid=2, **kw
    )


def run_train(index, store, val, model: dict | None = None, bank=None, prepared_bytes=None, **cfg):
    """Train the toy model for 2 epochs (``cfg``: TrainConfig overrides); ``bank``: the TokenBank to read."""
    base = dict(seed=0, epochs=2, episodes_per_epoch=16, batch_size=8, label_size=SIZE, patience=0, threads=1)
    base.update(cfg)
    config = TrainConfig(**base)
    targets = Targets("pixel", index, SIZE)
    return train(
        config=config,
        tokens=TokenBank(store) if bank is None else bank,
        model_config=model_config(**(model or {})),
        targets=targets,
        index=index,
        train_split="train",
        train_classes=[1, 2],
        fold=0,
        val_episodes=val,
        progress=False,
        prepared_bytes=prepared_bytes,
    )


def test_pixel_targets_and_presence(tmp_path):
    index, _ = toy_dataset(tmp_path, n_per_class=2)
    t = Targets("pixel", index, SIZE)
    q = "img00"  # class 1
    target = t.query_target(q, "img02", 1)
    assert target.shape == (SIZE, SIZE) and target.dtype == np.uint8
    assert set(np.unique(target)) <= {0, 1, 255} and (target == 1).any() and target[0, 0] == 255
    assert not (t.query_target(q, "img01", 2) == 1).any()  # class absent: background (void kept ignored)
    assert t.presence(q, 1) == 1 and t.presence(q, 2) == 0
    sm = t.support_mask("img02", 1)
    assert sm.dtype == bool and sm.any() and np.array_equal(sm, t.test_support_mask("img02", 1))


class FakeLabeler:
    enhancer = None

    def support_mask(self, image_id, size):
        m = np.zeros((size, size), dtype=bool)
        m[: size // 2] = True
        return m

    def pair_mask(self, support_id, query_id, size, present=True):
        m = np.zeros((size, size), dtype=bool)
        if present:
            m[:, : size // 2] = True
        return m


def test_image_and_mixed_targets(tmp_path):
    index, _ = toy_dataset(tmp_path, n_per_class=2)
    t = Targets("image", index, 8, labeler=FakeLabeler())
    assert t.support_mask("img02", 1)[:4].all() and not t.support_mask("img02", 1)[4:].any()
    assert t.query_target("img00", "img02", 1)[:, :4].all()  # present: pair pseudo-mask
    assert not t.query_target("img00", "img01", 2).any()  # absent: all background
    lab = FakeLabeler()
    lab.enhancer = object()
    m = Targets("mixed", index, 8, labeler=lab, labelled_ids={"img00"})
    gt = Targets("pixel", index, 8)
    assert np.array_equal(m.query_target("img00", "img02", 1), gt.query_target("img00", "img02", 1))
    assert np.array_equal(m.support_mask("img00", 1), gt.support_mask("img00", 1))
    assert np.array_equal(m.support_mask("img02", 1), lab.support_mask("img02", 8))  # unlabelled: pseudo
    assert np.array_equal(m.test_support_mask("img00", 1), lab.support_mask("img00", 8))  # test rule
    with pytest.raises(Exception, match="enhancer"):
        Targets("mixed", index, 8, labeler=FakeLabeler())


def test_stuff_classes_learn_from_the_complement_of_attention(tmp_path):
    from fscs.core.errors import FscsError
    from fscs.learn.targets import complement_classes

    index, _ = toy_dataset(tmp_path, n_per_class=2)
    lab = FakeLabeler()
    t = Targets("image", index, 8, labeler=lab, complement_classes={1})
    self_mask = lab.support_mask("img02", 8)
    assert np.array_equal(t.support_mask("img02", 1), ~self_mask)  # stuff: complement
    assert np.array_equal(t.support_mask("img02", 2), self_mask)  # object: the attention mask
    assert np.array_equal(t.test_support_mask("img02", 1), ~self_mask) and t.test_mask_depends_on_class
    query_self = lab.support_mask("img00", 8)
    assert np.array_equal(t.query_target("img00", "img02", 1), (~query_self).astype(np.uint8))
    assert not t.query_target("img00", "img01", 2).any()  # absent: still all background
    assert Targets("pixel", index, 8, complement_classes={1}).complement == set()
    names = {1: "grass", 2: "cow"}
    grass = PseudoConfig(stuff_masks="complement", stuff_classes=["grass"])
    assert complement_classes(grass, names) == {1}
    assert complement_classes(PseudoConfig(stuff_masks="same", stuff_classes=["grass"]), names) == set()
    with pytest.raises(FscsError, match="unknown classes"):
        complement_classes(PseudoConfig(stuff_masks="complement", stuff_classes=["sky"]), names)


def test_training_is_deterministic(tmp_path):
    index, store = toy_dataset(tmp_path)
    a = run_train(index, store, val_frame(index))
    b = run_train(index, store, val_frame(index))
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert [r["train_loss"] for r in a.curve] == [r["train_loss"] for r in b.curve]
    assert len(a.curve) == 2 and a.curve[0]["val_miou"] is not None


def test_weight_average_keeps_the_mean_of_the_steps_and_leaves_training_alone(tmp_path):
    """ema > 0 keeps the running mean of the weights after each step (here 2 steps, far below the decay's
    horizon): (W1 + W2) / 2, where W1 and W2 come from plain runs of 1 and 2 steps on the same episodes."""
    index, store = toy_dataset(tmp_path)
    one = run_train(index, store, None, epochs=1, episodes_per_epoch=8).model.state_dict()
    two = run_train(index, store, None, epochs=1, episodes_per_epoch=16)
    avg = run_train(index, store, None, epochs=1, episodes_per_epoch=16, ema=0.99)
    assert [r["train_loss"] for r in avg.curve] == [r["train_loss"] for r in two.curve]
    moved = 0
    for k, v in avg.model.state_dict().items():
        w1, w2 = one[k], two.model.state_dict()[k]
        torch.testing.assert_close(v, (w1 + w2) / 2, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(w1, w2))
    assert moved > 10  # the two steps did change the weights, so the mean is not trivially either


def test_weight_average_decay_is_checked():
    from fscs.core.errors import FscsError

    assert TrainConfig.from_params({"ema": 0.99}).ema == 0.99
    for bad in (1.0, -0.1):
        with pytest.raises(FscsError, match=r"train.ema must be in \[0, 1\)"):
            TrainConfig.from_params({"ema": bad})


def test_tiny_model_overfits_toy_episodes(tmp_path):
    index, store = toy_dataset(tmp_path)
    val = val_frame(index)
    torch.manual_seed(0)
    res = run_train(index, store, val, epochs=12, episodes_per_epoch=64, lr=3e-3, patience=0)
    losses = [r["train_loss"] for r in res.curve]
    print("toy losses", losses, "val mIoU", [r["val_miou"] for r in res.curve])
    assert losses[-1] < losses[0] / 5
    # the toy masks are recovered: IoU of (fg prob >= 0.5) with the GT object, class-present pairs
    targets = Targets("pixel", index, SIZE)
    pred = CSTPredictor(res.model, TokenBank(store), targets.test_support_mask)
    inter = union = 0
    correct = 0
    for row in val.itertuples():
        presence, fg = pred.predict(row.query_id, row.support_classes, row.support_ids)
        correct += int((presence[0] > 0.5) == bool(row.labels[0]))
        up = torch.nn.functional.interpolate(torch.from_numpy(fg)[None], size=(SIZE, SIZE), mode="bilinear")[
            0, 0
        ]
        gt = targets.gt(row.query_id)
        valid = gt != 255
        p = (up.numpy() >= 0.5) & valid
        g = (gt == row.support_classes[0]) & valid
        inter += (p & g).sum()
        union += (p | g).sum()
    iou = inter / union
    print("toy IoU", iou, "presence accuracy", correct / len(val))
    assert iou > 0.8
    assert correct / len(val) > 0.9


def test_loss_ignores_void_and_handles_empty_targets():
    torch.manual_seed(0)
    from fscs.learn.model import CST

    model = CST(model_config())
    q = torch.randn(2, L, 17, D)
    target = torch.full((2, SIZE, SIZE), 255, dtype=torch.long)
    prepared = model.prepare_query(q), model.prepare_support(q)
    loss = episode_loss(model, *prepared, torch.ones(2, 4, 4), target, torch.tensor([0, 1]), 0.1)
    assert torch.isfinite(loss)


# ---- the train and evaluate stages on a tiny VOC dataset with the tiny random ViT ----------------------
@pytest.fixture
def tiny_artifacts(tmp_path, voc_fixture):
    import yaml

    from stages import extract_shard as extract
    from stages import prepare

    params = dict(voc_fixture.params)
    params["episodes"] = {**params["episodes"], "test_per_fold": 6, "val_per_fold": 4}
    params["backbone"] = {"name": "vit_tiny_random", "input_size": 32, "layers": "all", "batch_size": 16}
    params["pseudo"] = {"recipe": "cst", "cst_threshold": 0.4}
    params["train"] = {
        "seed": 0,
        "epochs": 2,
        "episodes_per_epoch": 8,
        "batch_size": 4,
        "label_size": 16,
        "patience": 1,
        "threads": 1,
        "model": {"support_size": 4, "channels": [16, 32], "pooled_grid": 2},
    }
    params["evaluate"] = {"void": "ignore"}
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    d = tmp_path / "data"
    prepare.main(["--params", str(p), "--index", str(d / "index.parquet"), "--episodes", str(d / "episodes")])
    extract.main(
        [
            "--params",
            str(p),
            "--index",
            str(d / "index.parquet"),
            "--out",
            str(d / "features.h5"),
            "--report",
            str(tmp_path / "extract.json"),
        ]
    )
    return tmp_path, p, d


def test_train_and_evaluate_stages(tiny_artifacts, capsys):
    import json

    import yaml

    from fscs.core.errors import FscsError
    from fscs.learn.model import read_checkpoint
    from stages import evaluate
    from stages import train as train_stage

    tmp_path, p, d = tiny_artifacts
    common = [
        "--params",
        str(p),
        "--supervision",
        "image",
        "--fold",
        "0",
        "--index",
        str(d / "index.parquet"),
        "--folds",
        str(d / "episodes" / "folds.json"),
        "--episodes",
        str(d / "episodes"),
        "--features",
        str(d / "features.h5"),
    ]
    ckpt_path = tmp_path / "models" / "fold0.pt"
    curve = tmp_path / "curve.csv"
    train_stage.main([*common, "--out", str(ckpt_path), "--curve", str(curve)])
    ckpt = read_checkpoint(ckpt_path)
    assert ckpt["supervision"] == "image" and ckpt["fold"] == 0 and ckpt["config"]["label_size"] == 16
    assert ckpt["config"]["backbone"]["backbone"] == "vit_tiny_random"
    assert ckpt["device"] == "cpu" and ckpt["config"]["backbone"]["precision"] == "fp32"  # recorded
    lines = curve.read_text().splitlines()
    assert lines[0].split(",") == list(CURVE_COLUMNS) and len(lines) == 3
    rows = [dict(zip(CURVE_COLUMNS, line.split(","), strict=True)) for line in lines[1:]]
    assert [int(r["step"]) for r in rows] == [int(r["epoch"]) * int(rows[0]["step"]) for r in rows]
    assert all(0.0 <= float(r["val_auc"]) <= 1.0 and 0.0 <= float(r["val_fg_fraction"]) <= 1.0 for r in rows)

    out = tmp_path / "eval.json"
    evaluate.main([*common, "--checkpoint", str(ckpt_path), "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["fold"] == 0 and doc["supervision"] == "image" and doc["void"] == "ignore"
    assert doc["run"]["device"] == "cpu"
    assert set(doc["results"]) == {"1way1shot", "1way5shot", "2way1shot", "2way5shot"}
    for r in doc["results"].values():
        assert r["episodes"] == 6 and 0 <= r["er"] <= 100 and 0 <= r["miou"] <= 100
    assert set(doc["per_class_iou"]["1way1shot"]) == {"1", "2", "3"}

    # a store from another backbone configuration is refused, naming the attribute
    params = yaml.safe_load(p.read_text())
    params["backbone"]["input_size"] = 40
    p2 = tmp_path / "params40.yaml"
    p2.write_text(yaml.safe_dump(params))
    from stages import extract_shard as extract

    extract.main(
        [
            "--params",
            str(p2),
            "--index",
            str(d / "index.parquet"),
            "--out",
            str(d / "f40.h5"),
            "--report",
            str(tmp_path / "e40.json"),
        ]
    )
    bad = [a if a != str(d / "features.h5") else str(d / "f40.h5") for a in common]
    with pytest.raises(FscsError, match="input_size"):
        evaluate.main([*bad, "--checkpoint", str(ckpt_path), "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(FscsError, match="trained with supervision 'image'"):
        evaluate.main([*common[:3], "pixel", *common[4:], "--checkpoint", str(ckpt_path), "--out", str(out)])


def test_train_stage_mixed_supervision(tiny_artifacts):
    """A mixed cell trains and evaluates; ``train.by_supervision.mixed`` overrides its model (only it)."""
    import yaml

    from fscs.features.store import FeatureStore
    from fscs.learn.model import read_checkpoint
    from fscs.pseudo.enhancer import Enhancer, save_enhancer, write_enhanced
    from stages import evaluate
    from stages import train as train_stage

    tmp_path, p, d = tiny_artifacts
    params = yaml.safe_load(p.read_text())
    params["train"]["by_supervision"] = {"mixed": {"model": {"prior": "prototype"}, "epochs": 1}}
    p = tmp_path / "params-mixed.yaml"
    p.write_text(yaml.safe_dump(params))
    torch.manual_seed(0)
    with FeatureStore(d / "features.h5") as store:
        ids = list(store.image_ids)
        heads, grid = store.num_heads, store.grid
    save_enhancer(tmp_path / "enhancer.pt", {"all": Enhancer(in_channels=heads)}, {"in_channels": heads})
    labelled = [i for i in ids if i.startswith("train_1")]
    maps = np.full((len(ids), *grid), 0.5, dtype=np.float16)
    write_enhanced(tmp_path / "enhanced.h5", ids, {"all": maps}, labelled, {})
    common = [
        "--params",
        str(p),
        "--supervision",
        "mixed",
        "--fold",
        "0",
        "--index",
        str(d / "index.parquet"),
    ]
    common += ["--folds", str(d / "episodes" / "folds.json"), "--episodes", str(d / "episodes")]
    common += ["--features", str(d / "features.h5"), "--enhancer", str(tmp_path / "enhancer.pt")]
    out = tmp_path / "mixed.pt"
    train_stage.main(
        [
            *common,
            "--enhanced",
            str(tmp_path / "enhanced.h5"),
            "--out",
            str(out),
            "--curve",
            str(tmp_path / "c.csv"),
        ]
    )
    ckpt = read_checkpoint(out)
    assert ckpt["supervision"] == "mixed" and ckpt["config"]["prior"] == "prototype"
    assert ckpt["config"]["support_size"] == 4  # the base model keys stay: model merges key by key
    assert len(ckpt["curve"]) == 1 and ckpt["train"]["epochs"] == 1 and "by_supervision" not in ckpt["train"]
    evaluate.main([*common, "--checkpoint", str(out), "--out", str(tmp_path / "mixed.json")])
    assert (tmp_path / "mixed.json").is_file()


def test_holdout_cell_validates_on_training_classes_it_never_trains_on(tiny_artifacts, monkeypatch):
    import yaml

    import fscs.learn.train
    from experiments.holdout import held_out_classes, holdout_cell, inner_split, score_inner
    from fscs.config.params import load_config
    from fscs.learn.cell import load_cell
    from fscs.learn.train import train_cell

    tmp_path, p, d = tiny_artifacts
    params = yaml.safe_load(p.read_text())
    paths = {"index": str(d / "index.parquet"), "folds": str(d / "episodes" / "folds.json")}
    paths |= {"episodes": str(d / "episodes"), "features": str(d / "features.h5")}
    cell = load_cell(
        load_config(p), "pixel", 0, {**paths, "pseudo": None, "enhanced": None, "enhancer": None}
    )
    assert held_out_classes([5, 1, 3, 9], fold=1, every=2) == [3, 9]
    inner = holdout_cell(cell, every=2, episodes=6)
    held = held_out_classes(cell.train_classes, 0, 2)
    assert held and inner.val_classes == held
    assert sorted(inner.train_classes + held) == sorted(cell.train_classes)
    assert len(inner.val) == 6 and {c for cs in inner.val["support_classes"] for c in cs} <= set(held)
    assert cell.val_classes is None  # the pipeline's cell validates on its training classes
    assert set(cell.val["shot"]) == {1} and set(cell.val_kshot["shot"]) == {5}  # 1-way K-shot rows apart
    assert set(cell.val_kshot["way"]) == {1} and set(cell.val_kshot["fold"]) == {0}
    assert inner.val_kshot is None  # held-out validation has no K-shot rows

    seen = []
    real = fscs.learn.train.validate
    monkeypatch.setattr(fscs.learn.train, "validate", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    cfg = TrainConfig.from_params({**params["train"], "epochs": 1})
    result = train_cell(inner, cfg, progress=False)
    assert seen == [held] and len(result.curve) == 1  # mIoU averaged over the held-out classes

    # the inner test: select on the kept classes' validation episodes, score the held-out ones once
    kept_cell, test = inner_split(cell, every=2, episodes=6)
    assert kept_cell.train_classes == inner.train_classes and kept_cell.val_classes is None
    assert {c for cs in kept_cell.val["support_classes"] for c in cs} <= set(kept_cell.train_classes)
    assert {c for cs in kept_cell.val_kshot["support_classes"] for c in cs} <= set(kept_cell.train_classes)
    assert test.equals(inner.val)  # the same held-out episodes
    cfg_model = result.model.config
    cfg_model.presence_threshold = cfg_model.fg_threshold = 1e-6  # everything present, all foreground
    scores = score_inner(kept_cell, result.model, test)
    assert 0 < scores["inner_miou"] <= 100 and scores["inner_present_frac"] == 1.0  # all called present
    present_rate = 100.0 * float(test["labels"].map(lambda v: bool(v[0])).mean())
    assert scores["inner_er"] == pytest.approx(present_rate)  # calling all present scores the present rate
    assert scores["inner_er_oracle"] >= max(scores["inner_er"], 100 - present_rate)  # >= either constant rule
    assert 0.0 <= scores["inner_presence_auc"] <= 1.0 or np.isnan(scores["inner_presence_auc"])
    moved = score_inner(kept_cell, result.model, test, offsets=(20.0,))  # thresholds at ~0.998
    assert moved["inner_er@+20"] == pytest.approx(100 - present_rate)  # now every episode called absent
    assert moved["inner_er"] == scores["inner_er"] and cfg_model.presence_threshold == 1e-6  # restored
    cfg_model.fg_threshold = 1 - 1e-6  # no pixel reaches the foreground threshold: empty masks
    assert score_inner(kept_cell, result.model, test)["inner_miou"] == 0.0
    cell.store.close()


def test_presence_rules_choose_thresholds_on_validation_and_score_held_out_episodes():
    """A foreground map that separates present from absent beats a head that does not, and each rule's
    threshold comes from the validation episodes (a shift between seen and novel classes costs ER)."""
    from experiments.holdout import presence_rules, presence_scores

    def frame(prefix, labels):
        rows = [(0, i, 1, 1, f"{prefix}{i}", [7], [["s"]], [bool(v)]) for i, v in enumerate(labels)]
        cols = ["fold", "episode", "way", "shot", "query_id", "support_classes", "support_ids", "labels"]
        return pd.DataFrame(rows, columns=cols)

    class Stub:  # the predictor interface: presence is uninformative, the map's peak carries presence
        def __init__(self, peak):
            self.peak = peak

        def predict(self, query_id, classes, shots):
            fg = np.full((1, 4, 4), 0.1, np.float32)
            fg[0, 0, 0] = self.peak[query_id]
            return np.array([0.5], np.float32), fg

    val, test = frame("v", [1, 0, 1, 0, 1, 0]), frame("t", [1, 1, 0, 0])
    peaks = {"v0": 0.9, "v1": 0.3, "v2": 0.8, "v3": 0.2, "v4": 0.9, "v5": 0.3}

    def rules(stub):
        return presence_rules(presence_scores(stub, val), presence_scores(stub, test))

    out = rules(Stub({**peaks, "t0": 0.9, "t1": 0.7, "t2": 0.3, "t3": 0.1}))
    assert out["val_er_fg_max"] == 100.0 and out["inner_er_fg_max"] == 100.0
    assert out["val_er_head"] == 50.0 and out["inner_er_head"] == 50.0  # a constant calls all the same way
    # novel absent queries that peak above the threshold chosen on seen classes are called present
    shifted = rules(Stub({**peaks, "t0": 0.9, "t1": 0.7, "t2": 0.6, "t3": 0.1}))
    assert shifted["inner_er_fg_max"] == 75.0


def test_model_selection_rule():
    from fscs.learn.train import improves

    assert improves(10.0, None) and improves(10.0, 5.0) and not improves(5.0, 10.0) and not improves(5.0, 5.0)
    assert improves(0.0, 0.0)  # all-background epochs: the later (more trained) one is kept
    assert not improves(0.0, 3.0) and improves(None, None)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from fscs.learn.train import lr_factor

    f = [lr_factor(s, 100, "cosine", 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # 10 warmup steps, linear
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))  # then non-increasing
    assert f[-1] < 0.001 and f[55] == pytest.approx(0.5, abs=0.02)
    assert {lr_factor(s, 100, "constant", 0.1) for s in range(100)} == {1.0}


def test_pixel_signals_tell_unlearned_from_underconfident():
    from fscs.learn.train import pixel_signals

    rng = np.random.default_rng(0)
    labels = rng.random(20000) < 0.2
    # under-confident but ranked right: every score below 0.5, foreground higher than background
    shy = np.where(labels, 0.3, 0.1) + rng.normal(0, 0.02, labels.size)
    s = pixel_signals(shy, labels)
    assert s["auc"] > 0.99 and s["best_iou"] > 0.95 and s["fg_fraction"] == 0.0
    assert 0.1 < s["best_threshold"] < 0.3
    # not learned: scores unrelated to the labels
    s = pixel_signals(rng.random(labels.size), labels)
    assert abs(s["auc"] - 0.5) < 0.03 and s["best_iou"] < 0.3


def test_he_init_starts_at_the_foreground_prior():
    from fscs.learn.model import CST

    torch.manual_seed(0)
    cfg = model_config()
    cfg.init, cfg.fg_prior = "he", 0.2
    model = CST(cfg)
    q = torch.randn(3, L, 17, D)
    cls_logits, seg_logits = model(q, q, torch.ones(3, 4, 4))
    p_fg = torch.softmax(seg_logits, dim=1)[:, 1]
    assert p_fg.mean().item() == pytest.approx(0.2, abs=0.02)
    assert torch.softmax(cls_logits, dim=1)[:, 1].mean().item() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="init"):
        cfg.init = "xavier"
        CST(cfg)


@pytest.mark.parametrize("prior", ["none", "prototype"])
def test_a_few_dozen_steps_move_predictions_off_all_background(tmp_path, prior):
    """24 Adam steps on toy episodes: the foreground maps rank pixels well and calibrated thresholds turn
    that into masks (the checkpoint keeps the thresholds its best epoch was scored with); with and without
    the prototype prior map."""
    index, store = toy_dataset(tmp_path)
    torch.manual_seed(0)
    res = run_train(
        index,
        store,
        val_frame(index),
        {"prior": prior},
        epochs=3,
        episodes_per_epoch=64,
        lr=3e-3,
        calibrate=True,
    )
    assert res.model.uses_prior == (prior == "prototype")
    last = res.curve[-1]
    assert last["step"] == 24
    assert last["val_auc"] > 0.8 and last["val_miou_cal"] > 30.0, last  # ranked well: learned
    best = res.curve[res.best_epoch - 1]
    assert res.model.config.fg_threshold == best["fg_threshold"]
    assert res.best_val_miou == best["val_miou_cal"]
    # through the predictor (thresholds applied) the masks are no longer all background
    targets = Targets("pixel", index, SIZE)
    pred = CSTPredictor(res.model, TokenBank(store), targets.test_support_mask)
    row = next(r for r in val_frame(index).itertuples() if r.labels[0])
    presence, fg = pred.predict(row.query_id, row.support_classes, row.support_ids)
    assert presence[0] > 0.5 and 0.05 < (fg >= 0.5).mean() < 0.95
