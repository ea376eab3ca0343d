"""The memory budget bounds what a run holds and changes no number: byte-bounded caches, prepared features
that do not depend on their batch, and training / evaluation under a budget far below the store's size
giving bit-identical results to an unbounded run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import SIZE, model_config, toy_dataset, val_frame

from fscs.config.params import TrainConfig, load_config, validate
from fscs.core.errors import FscsError
from fscs.core.lru import LRUCache, nbytes
from fscs.core.memory import MIB, budget_bytes, host_ram
from fscs.learn.model.cst import CST
from fscs.learn.predictor import CSTPredictor, PreparedBank, TokenBank
from fscs.learn.targets import Targets
from fscs.learn.train import train


def test_lru_keeps_at_most_its_bytes_least_recent_going_first():
    c = LRUCache(max_bytes=100)
    for i in range(5):
        c.put(i, np.zeros(30, np.uint8))
    assert list(c) == [2, 3, 4] and c.bytes == 90 and c.peak_bytes == 90
    c.get_or(2, lambda: None)  # 2 becomes the most recent
    c.put(5, np.zeros(30, np.uint8))
    assert list(c) == [4, 2, 5]
    c.pop(4)
    del c[2]
    assert c.bytes == 30
    c.put(6, np.zeros(500, np.uint8))  # larger than the bound: kept alone
    assert list(c) == [6] and c.bytes == 500
    assert nbytes((torch.zeros(4, dtype=torch.float16), {"a": np.zeros(3)})) == 8 + 24


def test_budget_params_resolve_to_bytes_and_auto_scales_with_the_machine():
    assert budget_bytes(64, "tokens") == 64 * MIB
    assert budget_bytes("auto", "tokens") == int(0.25 * host_ram())
    assert budget_bytes("auto", "prepared") == int(0.125 * host_ram())
    config = load_config()
    assert config.memory.tokens_mb == "auto" and config.memory.prepared_mb == "auto"
    with pytest.raises(FscsError, match="memory.tokens_mb"):
        validate({**_params(), "memory": {"tokens_mb": 0}})


def _params() -> dict:
    import yaml

    return yaml.safe_load(open("params.yaml"))


def test_prepared_features_do_not_depend_on_the_batch_they_are_prepared_in():
    torch.manual_seed(0)
    tokens = torch.randn(7, 2, 17, 16).half()
    for prior in ("none", "prototype"):
        model = CST(model_config(prior=prior))
        with torch.no_grad():
            for prepare in (model.prepare_query, model.prepare_support, model.prepare_prior):
                batched = prepare(tokens)
                alone = torch.cat([prepare(tokens[i : i + 1]) for i in range(len(tokens))])
                assert torch.equal(batched, alone)


def _train(index, store, val, tokens_bytes, prepared_bytes):
    config = TrainConfig(
        seed=0, epochs=2, episodes_per_epoch=16, batch_size=8, label_size=SIZE, patience=0, threads=1
    )
    bank = TokenBank(store, tokens_bytes)
    res = train(
        config=config,
        tokens=bank,
        model_config=model_config(),
        targets=Targets("pixel", index, SIZE),
        index=index,
        train_split="train",
        train_classes=[1, 2],
        fold=0,
        val_episodes=val,
        progress=False,
        prepared_bytes=prepared_bytes,
    )
    return res, bank


def test_training_under_a_tiny_budget_is_the_same_training(tmp_path):
    index, store = toy_dataset(tmp_path, n_per_class=8)
    val = val_frame(index)
    row = 2 * 17 * 16 * 2  # one image's float16 tokens
    free, _ = _train(index, store, val, None, None)
    tight, bank = _train(index, store, val, 3 * row, 64 * 1024)
    assert bank.peak_bytes <= 3 * row  # the budget held ...
    assert bank.reads > len(index)  # ... and bound: images were read again
    a, b = free.model.state_dict(), tight.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in free.curve]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in tight.curve]


def test_evaluation_under_a_tiny_budget_gives_the_same_predictions(tmp_path):
    index, store = toy_dataset(tmp_path, n_per_class=8)
    episodes = val_frame(index)
    targets = Targets("pixel", index, SIZE)
    model = CST(model_config())
    runs = []
    for tokens_bytes, prepared_bytes in ((None, None), (2 * 1088, 40_000)):
        bank = TokenBank(store, tokens_bytes)
        pred = CSTPredictor.for_targets(model, bank, targets, 4, 1, prepared_bytes)
        pred.prefetch(episodes, progress=False)
        out = [pred.predict(r.query_id, r.support_classes, r.support_ids) for r in episodes.itertuples()]
        runs.append((out, bank, pred.prepared))
    (free, _, _), (tight, bank, prepared) = runs
    assert bank.peak_bytes <= 2 * 1088 and prepared.peak_bytes <= 40_000
    assert bank.reads > len(index)
    for (p0, f0), (p1, f1) in zip(free, tight, strict=True):
        assert np.array_equal(p0, p1) and np.array_equal(f0, f1)


def test_prepared_bank_evicts_across_kinds_under_one_budget(tmp_path):
    index, store = toy_dataset(tmp_path, n_per_class=4)
    model = CST(model_config())
    ids = list(index.index)
    one_query = model.prepare_query(TokenBank(store).get(ids[:1]))[0]
    budget = 3 * one_query.numel() * one_query.element_size()
    bank = PreparedBank(model, TokenBank(store), budget)
    for i in ids:
        bank.get("query", [i])
        bank.get("support", [i])
    assert bank.peak_bytes <= budget
    assert torch.equal(bank.get("query", ids[:1])[0], one_query)  # evicted, prepared again: the same


def test_missing_images_are_named_with_the_store(tmp_path):
    index, store = toy_dataset(tmp_path, n_per_class=2)
    store.path = tmp_path / "features.h5"
    type(store).__contains__ = lambda self, i: i in index.index
    with pytest.raises(
        FscsError, match=r"features.h5: 1 episode images are not in the store \(first: 'nope'\)"
    ):
        TokenBank(store).require(["img00", "nope"], "episode images")
