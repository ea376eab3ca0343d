"""Folds (contiguous / interleaved) and the episode sampling protocol."""

from __future__ import annotations

import collections
import itertools

import pandas as pd
import pytest

from fscs.core.errors import FscsError
from fscs.core.io import write_json
from fscs.data.episodes import (
    EPISODE_COLUMNS,
    EpisodeSampler,
    TrainEpisodeSampler,
    build_episodes,
    episode_lists,
    read_episodes,
    rng_for,
    write_episodes,
)
from fscs.data.folds import included_classes, make_folds, read_folds, split_folds
from fscs.data.index import build_index


def synthetic_index(n_classes=5, per_class=10, split="val", extra=None):
    """Single-class images: class c has `per_class` images named c_k."""
    rows = [
        {"image_id": f"{c}_{k}", "split": split, "classes": [c]}
        for c in range(1, n_classes + 1)
        for k in range(per_class)
    ]
    rows += extra or []
    return pd.DataFrame(rows).set_index("image_id", drop=False).rename_axis(None)


# --- folds -----------------------------------------------------------------------------------------------


def test_pascal5i_folds():
    folds = split_folds(list(range(1, 21)), 4, "contiguous")
    for i in range(4):
        assert folds[i]["test"] == list(range(5 * i + 1, 5 * i + 6))
        assert folds[i]["train"] == [c for c in range(1, 21) if c not in folds[i]["test"]]


def test_coco20i_folds():
    folds = split_folds(list(range(1, 81)), 4, "interleaved")
    for i in range(4):
        assert folds[i]["test"] == list(range(i + 1, 81, 4))
        assert folds[i]["test"][-1] == i + 77 and len(folds[i]["test"]) == 20
        assert len(folds[i]["train"]) == 60


def test_msrc_like_folds():
    names = [
        "building",
        "grass",
        "tree",
        "cow",
        "horse",
        "sheep",
        "sky",
        "mountain",
        "aeroplane",
        "water",
        "face",
        "car",
        "bicycle",
        "flower",
        "sign",
        "bird",
        "book",
        "chair",
        "road",
        "cat",
        "dog",
        "body",
        "boat",
    ]
    classes = {i + 1: n for i, n in enumerate(names)}
    doc = make_folds("msrc", classes, ["horse", "mountain"], 4, "contiguous", "train", "val")
    assert len(doc["included"]) == 21 and 5 not in doc["included"] and 8 not in doc["included"]
    assert [len(doc["folds"][str(f)]["test"]) for f in range(4)] == [6, 5, 5, 5]
    assert doc["folds"]["0"]["test"] == [1, 2, 3, 4, 6, 7]
    assert set(doc) == {"dataset", "classes", "included", "order", "folds", "train_split", "test_split"}
    assert doc["classes"]["5"] == "horse"


def test_unknown_excluded_class():
    with pytest.raises(FscsError, match="'unicorn'"):
        included_classes({1: "a", 2: "b"}, ["unicorn"])


def test_bad_fold_params():
    with pytest.raises(FscsError, match="folds.order"):
        split_folds([1, 2, 3], 2, "random")
    with pytest.raises(FscsError, match="folds.n = 4"):
        split_folds([1, 2, 3], 4, "contiguous")


def test_read_folds(tmp_path):
    doc = make_folds("x", {1: "a", 2: "b"}, [], 2, "interleaved", "train", "val")
    write_json(tmp_path / "folds.json", doc)
    assert read_folds(tmp_path / "folds.json") == doc
    with pytest.raises(FscsError, match="not found"):
        read_folds(tmp_path / "nope.json")


# --- sampling protocol -----------------------------------------------------------------------------------


def test_one_way_statistics():
    index = synthetic_index(n_classes=5)
    sampler = EpisodeSampler(index, [1, 2, 3, 4, 5], "val", way=1, shot=1)
    episodes = [sampler.episode(i) for i in range(2000)]
    positive = sum(e.labels[0] for e in episodes) / len(episodes)
    assert abs(positive - 0.5) < 0.04
    # a class other than the query's is the support with probability 1/(2(C-1)) = 1/8; each class is
    # not the query's with probability 4/5 (uniform entries), so P(support = c != query class) = 1/10
    others = collections.Counter(
        e.support_classes[0] for e in episodes if e.support_classes[0] != e.query_class
    )
    for c in range(1, 6):
        assert abs(others[c] / len(episodes) - 0.1) < 0.03
    queries = collections.Counter(e.query_class for e in episodes)
    assert all(abs(queries[c] / 2000 - 0.2) < 0.04 for c in range(1, 6))


def test_two_way_statistics():
    index = synthetic_index(n_classes=5)
    sampler = EpisodeSampler(index, [1, 2, 3, 4, 5], "val", way=2, shot=5)
    episodes = [sampler.episode(i) for i in range(2000)]
    # P(query class drawn) = 1/2 + 1/2 * (1/2) / (1/2 + 3/8) = 11/14
    with_query = sum(e.query_class in e.support_classes for e in episodes) / len(episodes)
    assert abs(with_query - 11 / 14) < 0.04
    for e in episodes:
        assert len(e.support_classes) == 2 and len(set(e.support_classes)) == 2
        assert e.support_classes == sorted(e.support_classes)
        assert e.labels == [int(c == e.query_class) for c in e.support_classes]


def test_support_rules(voc_fixture):
    index, _ = build_index(voc_fixture.params["dataset"])
    sampler = EpisodeSampler(index, [1, 2, 3], "val", way=2, shot=5)
    for i in range(300):
        e = sampler.episode(i)
        assert index.loc[e.query_id, "split"] == "val"
        assert e.query_class in index.loc[e.query_id, "classes"]
        assert e.labels == [int(c in index.loc[e.query_id, "classes"]) for c in e.support_classes]
        for c, ids in zip(e.support_classes, e.support_ids, strict=True):
            assert len(ids) == 5 and len(set(ids)) == 5
            assert e.query_id not in ids
            for image_id in ids:
                assert index.loc[image_id, "split"] == "val"
                assert c in index.loc[image_id, "classes"]


def test_episodes_repeatable():
    index = synthetic_index()
    a = build_episodes(index, [1, 2, 3, 4, 5], "val", 2, 1, 50, seed=7)
    b = build_episodes(index, [1, 2, 3, 4, 5], "val", 2, 1, 50, seed=7)
    assert a == b
    # episode i comes from seed + i: a list from seed 8 is the same list shifted by one
    c = build_episodes(index, [1, 2, 3, 4, 5], "val", 2, 1, 49, seed=8)
    assert [r["query_id"] for r in c] == [r["query_id"] for r in a[1:]]
    assert [r["support_ids"] for r in c] == [r["support_ids"] for r in a[1:]]


def test_train_sampler():
    index = synthetic_index(split="train")
    sampler = TrainEpisodeSampler(index, [2, 3, 4], "train", seed=3)
    stream = list(itertools.islice(iter(sampler), 200))
    assert stream == list(itertools.islice(iter(TrainEpisodeSampler(index, [2, 3, 4], "train", seed=3)), 200))
    assert {e.support_classes[0] for e in stream} <= {2, 3, 4}
    assert {e.query_class for e in stream} == {2, 3, 4}
    assert all(e.way == 1 and e.shot == 1 and len(e.support_ids[0]) == 1 for e in stream)
    assert sampler.episode(5) == sampler.sample(rng_for(8))


def test_too_few_images_error():
    index = synthetic_index(n_classes=3, per_class=5)
    with pytest.raises(FscsError, match=r"class 2 \(dog\) has 5 image\(s\) in split 'val'; 5-shot"):
        EpisodeSampler(index, [2, 3], "val", way=1, shot=5, class_names={2: "dog", 3: "cat"})
    EpisodeSampler(index, [2, 3], "val", way=1, shot=4)  # 5 images are enough for 4-shot


def test_too_few_images_drop():
    extra = [{"image_id": f"r{k}", "split": "val", "classes": [9]} for k in range(3)]
    index = synthetic_index(n_classes=3, per_class=8, extra=extra)
    sampler = EpisodeSampler(index, [1, 2, 3, 9], "val", way=2, shot=5, too_few="drop")
    assert sampler.dropped == [(9, 3)] and sampler.classes == [1, 2, 3]
    assert all(9 not in sampler.episode(i).support_classes for i in range(100))
    with pytest.raises(FscsError, match="too_few_images"):
        EpisodeSampler(index, [1], "val", too_few="maybe")


def test_way_larger_than_classes():
    with pytest.raises(FscsError, match="2-way episodes need at least 2 classes"):
        EpisodeSampler(synthetic_index(), [1], "val", way=2)


def test_episode_lists_and_parquet_bytes(voc_fixture, tmp_path):
    index, classes = build_index(voc_fixture.params["dataset"])
    folds = make_folds("tiny", classes, [], 2, "contiguous", "train", "val")
    test, dropped = episode_lists(index, folds, "test", [1, 2], [1, 5], 20, 0)
    assert dropped == [] and list(test.columns) == list(EPISODE_COLUMNS) and len(test) == 2 * 4 * 20
    val, _ = episode_lists(index, folds, "val", [1, 2], [1, 5], 5, 0)
    for role, frame, split in (("test", test, "val"), ("train", val, "train")):
        for row in frame.itertuples():
            allowed = set(folds["folds"][str(row.fold)][role])
            assert set(row.support_classes) <= allowed
            assert index.loc[row.query_id, "split"] == split
    write_episodes(test, tmp_path / "a.parquet")
    write_episodes(test, tmp_path / "b.parquet")
    again, _ = episode_lists(index, folds, "test", [1, 2], [1, 5], 20, 0)
    write_episodes(again, tmp_path / "c.parquet")
    data = (tmp_path / "a.parquet").read_bytes()
    assert data == (tmp_path / "b.parquet").read_bytes() == (tmp_path / "c.parquet").read_bytes()
    back = read_episodes(tmp_path / "a.parquet")
    assert back.equals(test)
    assert isinstance(back.loc[0, "support_ids"], list) and isinstance(back.loc[0, "support_ids"][0], list)
