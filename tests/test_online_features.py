"""Online features: tokens computed from the images equal the stored ones within float16 rounding, under a
byte budget; the params wiring is checked; the DVC graph is honest in both modes; a tiny study gives the same
metrics from the store and online."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from tiny_repo import ROOT, TINY, _merge, make_tiny_repo, run, tiny_env

from fscs.config.features import check_features
from fscs.config.overrides import fill_features, merged_params
from fscs.config.params import validate
from fscs.core.errors import FscsError
from fscs.data.index import build_index
from fscs.features.backbone import create_backbone
from fscs.features.extraction import extract_to_store
from fscs.features.online import OnlineStore, open_features
from fscs.features.store import FeatureStore
from fscs.learn.predictor import TokenBank


@pytest.fixture
def tiny_features(voc_fixture, tmp_path):
    """(index, backbone, stored features) of the VOC fixture with the tiny random ViT."""
    index, _ = build_index(voc_fixture.params["dataset"])
    ids, paths = [str(i) for i in index.index], [str(p) for p in index["image_path"]]
    backbone = create_backbone("vit_tiny_random", 32)
    extract_to_store(backbone, ids, paths, tmp_path / "features.h5", batch_size=4, progress=False)
    return index, backbone, FeatureStore(tmp_path / "features.h5")


def test_online_features_equal_the_stored_ones_within_float16_rounding(tiny_features):
    index, backbone, stored = tiny_features
    online = OnlineStore(backbone, dict(zip(index.index, index["image_path"], strict=True)))
    assert online.grid == stored.grid and online.layers == stored.layers and len(online) == len(stored)
    for image_id in list(index.index)[:6]:
        for read in ("tokens", "cls_query", "patch_keys"):
            a, b = getattr(online, read)(image_id), getattr(stored, read)(image_id)
            assert a.dtype == b.dtype == np.float16 and a.shape == b.shape
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2**-10, atol=2**-14)


def test_online_store_keeps_its_budget_and_recomputes_the_same_values(tiny_features):
    index, backbone, _ = tiny_features
    paths = dict(zip(index.index, index["image_path"], strict=True))
    one = OnlineStore(backbone, paths).tokens(index.index[0])
    online = OnlineStore(backbone, paths, cache_bytes=2 * 3 * one.nbytes)  # about two images' encodings
    ids = list(index.index)[:5]
    first = [online.tokens(i).copy() for i in ids]
    again = [online.tokens(i) for i in ids]
    assert online.computed == 10 and online._cache.peak_bytes <= 2 * 3 * one.nbytes
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    with pytest.raises(FscsError, match="'nope' is not in the dataset's index"):
        online.tokens("nope")
    bank = TokenBank(online, 2 * 3 * one.nbytes)
    assert torch.equal(bank.get(ids[:2])[1], torch.from_numpy(online.tokens(ids[1])))
    assert not bank._slabs  # read through the store's own encodings: no second copy


def _params(**features) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["features"] = {**params["features"], **features}
    return params


def test_params_wiring_is_filled_in_and_a_miswired_one_refused(tmp_path):
    online = fill_features(_params(source="online"))
    assert online["features"] == {
        "source": "online",
        "path": "data/raw/msrc",
        "shards": "data/raw/msrc",
        "stores": [],
    }
    assert online["backbone"]["shards"] == []
    check_features(validate(online))
    with pytest.raises(FscsError, match=r"features.path: 'data/features/msrc.h5' \(needs 'data/raw/msrc'\)"):
        check_features(validate(_params(source="online")))
    with pytest.raises(FscsError, match="fscs params --with FILE --out params.yaml"):
        open_features("data/features/other.h5", validate(_params(path="data/features/other.h5")))
    no_shards = _params()
    no_shards["backbone"]["shards"] = []
    with pytest.raises(FscsError, match=r"backbone.shards: \[\] \(needs at least \[0\]"):
        check_features(validate(no_shards))
    (tmp_path / "online.yaml").write_text("features: {source: online}\n")
    assert merged_params(tmp_path / "online.yaml", ROOT / "params.yaml")["features"]["stores"] == []


def _graph(tmp_path, params: dict) -> dict[str, dict]:
    """{stage: {"deps": [...], "params": [...]}} of the project's dvc.yaml under ``params``."""
    from dvc.repo import Repo

    tmp_path.mkdir(parents=True)
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        return {
            s.name: {
                "deps": [str(d.def_path) for d in s.deps if not hasattr(d, "params")],
                "params": sorted({k.split(".")[0] for d in s.deps if hasattr(d, "params") for k in d.params}),
            }
            for s in repo.index.stages
        }


READERS = ("pseudo", "enhancer", "train@pixel-0", "evaluate@pixel-0", "baselines@0", "report")


def test_dvc_graph_is_honest_in_both_modes(tmp_path):
    store = _graph(tmp_path / "store", fill_features(_params()))
    online = _graph(tmp_path / "online", fill_features(_params(source="online")))
    assert {"extract_shard@0", "extract@msrc"} <= set(store)
    assert not [s for s in online if s.startswith("extract")]  # no store is built
    for name in READERS:
        assert "data/features/msrc.h5" in store[name]["deps"], name
        assert not [d for d in online[name]["deps"] if d.startswith("data/features")], name
        assert "data/raw/msrc" in online[name]["deps"], name  # the images the tokens come from
        assert {"backbone", "features"} <= set(online[name]["params"]), name


@pytest.mark.slow
def test_a_tiny_study_gives_the_same_metrics_online(tmp_path, tiny_reproduced):
    stored, _ = tiny_reproduced
    repo = tmp_path / "online"
    env = tiny_env(tmp_path)
    make_tiny_repo(repo, env)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    params["features"]["source"] = "online"
    (repo / "params.yaml").write_text(yaml.safe_dump(fill_features(params), sort_keys=False))
    run(["dvc", "repro"], repo, env)
    assert not (repo / "data" / "features").exists()
    a = json.loads((stored / "reports" / "metrics.json").read_text())
    b = json.loads((repo / "reports" / "metrics.json").read_text())

    def numbers(doc, prefix=""):
        for k, v in sorted(doc.items()):
            if isinstance(v, dict):
                yield from numbers(v, f"{prefix}{k}.")
            elif isinstance(v, int | float) and not isinstance(v, bool):
                yield f"{prefix}{k}", float(v)

    got, want = dict(numbers(b)), dict(numbers(a))
    assert got.keys() == want.keys()
    far = {k: (want[k], got[k]) for k in want if abs(want[k] - got[k]) > 0.5}  # float16 rounding at most
    assert not far, far
