"""The memory budget bounds what a run holds and changes no number: byte-bounded caches, prepared features
that do not depend on their batch, and training / evaluation under a budget far below the store's size
giving bit-identical results to an unbounded run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import SIZE, model_config, run_train, toy_dataset, val_frame

from fscs.config.params import load_config, validate
from fscs.core.errors import FscsError
from fscs.core.lru import LRUCache, nbytes
from fscs.core.memory import MIB, budget_bytes, host_ram
from fscs.learn.model.cst import CST
from fscs.learn.predictor import CSTPredictor, PreparedBank, TokenBank
from fscs.learn.targets import Targets


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


class _Rows:
    """A store of ``n`` distinct (2, 3, 4) float16 rows, counting its reads."""

    def __init__(self, n: int):
        self.rows = {f"r{i}": np.full((2, 3, 4), i, np.float16) for i in range(n)}

    def __contains__(self, image_id):
        return image_id in self.rows

    def tokens(self, image_id):
        return self.rows[image_id]


def test_token_bank_reuses_its_slots_and_returns_every_row_right():
    """Rows live in preallocated slabs reused least recently used first: the slabs never exceed the budget's
    rows however many images pass through, and a batch longer than the budget still comes back right."""
    store, row = _Rows(200), 2 * 3 * 4 * 2
    bank = TokenBank(store, budget_bytes=5 * row)
    ids = list(store.rows)
    for i in range(0, 200, 7):
        batch = ids[i : i + 7]  # longer than the 5 rows the budget holds
        got = bank.get(batch)
        assert [int(g[0, 0, 0]) for g in got] == [int(b[1:]) for b in batch]
    assert sum(s.nbytes for s in bank._slabs) == 5 * row and bank.peak_bytes == 5 * row
    assert bank.reads == 200
    bank.get(["r199", "r0"])  # r199 is held; r0 goes into the oldest slot
    assert bank.reads == 201 and list(bank._slot)[-2:] == ["r199", "r0"]
    unbounded = TokenBank(store)
    unbounded.get(ids[:70])
    unbounded.get(ids[:70])
    assert unbounded.reads == 70 and len(unbounded._slabs) == 2  # grows a slab at a time


def test_token_bank_first_filled_in_inference_mode_serves_training_reads():
    """Validation (inference mode) may read an image first; training then reuses its slot. A slab allocated
    as an inference tensor refused that in-place refill (a train stage stopped on it)."""
    store = _Rows(10)
    bank = TokenBank(store, budget_bytes=2 * 2 * 3 * 4 * 2)
    with torch.inference_mode():
        bank.get(["r0", "r1"])
    got = bank.get(["r2", "r3"])  # outside inference mode: both slots refilled in place
    assert [int(g[0, 0, 0]) for g in got] == [2, 3] and not bank._slabs[0].is_inference()


def _train(index, store, val, tokens_bytes, prepared_bytes):
    bank = TokenBank(store, tokens_bytes)
    return run_train(index, store, val, bank=bank, prepared_bytes=prepared_bytes), bank


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
