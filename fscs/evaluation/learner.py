"""A trained CST checkpoint on one fold's fixed test episodes: the evaluate stage's work, as one call."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fscs.config.checkpoint import checkpoint_label_size
from fscs.config.params import Config
from fscs.core.errors import FscsError


def evaluate_checkpoint(
    config: Config,
    supervision: str,
    fold: int,
    checkpoint: str,
    paths: dict[str, str | None],
    batch_size: int | None = None,
) -> dict[str, Any]:
    """The evaluation JSON (`fscs.evaluation.episodes.evaluation_json` plus a ``run`` record) of
    ``checkpoint`` on ``fold``'s test episodes. ``paths``: index, folds, episodes, features, pseudo (optional:
    self maps recomputed from the store), enhancer (the mixed setting's test support masks)."""
    import torch

    from fscs.core.allocator import keep_freed_memory
    from fscs.core.device import describe, resolve_device
    from fscs.core.memory import budget_bytes, describe_budget
    from fscs.data.episodes import read_episodes
    from fscs.data.folds import class_names, fold_classes, read_folds
    from fscs.data.index import read_index
    from fscs.evaluation.episodes import evaluation_json, run_episodes
    from fscs.features.online import open_features
    from fscs.learn.model.cst import load_checkpoint, read_checkpoint
    from fscs.learn.predictor import CSTPredictor, TokenBank, scoring_workers
    from fscs.learn.targets import targets_for

    void, threads = config.evaluate.void, config.train.threads
    device = resolve_device()
    keep_freed_memory()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    ckpt = read_checkpoint(checkpoint)
    trained_as = ckpt.get("supervision")
    if trained_as is not None and trained_as != supervision:
        raise FscsError(
            f"{checkpoint}: trained with supervision '{trained_as}', evaluated as '{supervision}'"
        )
    label_size = checkpoint_label_size(ckpt, checkpoint)
    index = read_index(paths["index"])
    folds = read_folds(paths["folds"])
    test_path = Path(paths["episodes"]) / "test.parquet"
    episodes = read_episodes(test_path)
    episodes = episodes[episodes["fold"] == fold].reset_index(drop=True)
    if episodes.empty:
        raise FscsError(f"{test_path}: no test episodes for fold {fold}")

    t0 = time.perf_counter()
    tokens_bytes = budget_bytes(config.memory.tokens_mb, "tokens")
    with open_features(paths["features"], config, index, check=False) as store:
        model, _ = load_checkpoint(checkpoint, store=store)
        model.to(device)
        if supervision == "mixed" and not paths.get("enhancer"):
            raise FscsError("supervision 'mixed' needs --enhancer (its test support masks are enhanced)")
        targets = targets_for(
            supervision,
            config.pseudo,
            store,
            index,
            label_size,
            fold=ckpt.get("fold", fold),  # cross-dataset: the enhancer of the checkpoint's fold
            pseudo=paths.get("pseudo"),
            enhancer=paths.get("enhancer"),
            for_training=False,
            class_names=class_names(folds),
        )
        ids = [str(i) for i in episodes["query_id"]]
        ids += [str(s) for ss in episodes["support_ids"] for shots in ss for s in shots]
        budget = {
            "tokens": tokens_bytes,
            "prepared": budget_bytes(config.memory.prepared_mb, "prepared", device),
        }
        tokens = TokenBank(store, budget["tokens"])
        tokens.require(ids, "episode images")
        batch = batch_size or config.train.eval_batch_size
        workers = scoring_workers(model, threads)
        predictor = CSTPredictor.for_targets(model, tokens, targets, batch, workers, budget["prepared"])
        pairs = predictor.prefetch(episodes, progress=None)
        classes = fold_classes(folds, fold, "test")
        results = run_episodes(episodes, predictor, index, classes, void=void, progress=None)
    seconds = time.perf_counter() - t0
    doc = evaluation_json(fold, supervision, void, results)
    doc["run"] = {
        "pairs": int(pairs),
        "seconds": round(seconds, 1),
        "checkpoint_epoch": ckpt.get("epoch"),
        "device": describe(device),
        "memory": {
            "tokens": describe_budget(config.memory.tokens_mb, budget["tokens"]),
            "prepared": describe_budget(config.memory.prepared_mb, budget["prepared"]),
        },
    }
    return doc
