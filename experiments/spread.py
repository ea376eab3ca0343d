"""The run-to-run spread of a setting's learner: train its cells under perturbations that change only float
rounding or the seed, and score each on the fold's TEST episodes (all episode types) with its K-shot rule
(``--rule``: other rules as well, on the same weights).

    python -m experiments.spread --supervision pixel --fold 0 --fold 1 \
        --vs "" --vs "model.attention=sdpa" --vs "threads=1" --vs "seed=1" --rule mean_logit --out spread.csv

Selection stays on validation episodes (the cells train as the train stage does); the test scores only
measure how far a claim's margin moves between runs that no recipe choice separates. ``--vs`` / ``--set``
take `experiments.learner_sweep` overrides; each row of the CSV is one (fold, run, rule, episode type).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from experiments.learner_sweep import cell_arguments, merged, parse_overrides
from fscs.config.cst import KSHOT_RULES
from fscs.config.params import TrainConfig, read_params, validate
from fscs.config.paths import pipeline_paths
from fscs.data.episodes import read_episodes
from fscs.data.folds import fold_classes, read_folds
from fscs.evaluation.episodes import run_episodes
from fscs.learn.cell import load_cell
from fscs.learn.predictor import CSTPredictor, scoring_workers
from fscs.learn.train import train_cell


def score_test(
    cell, model, episodes: pd.DataFrame, classes: list[int], threads: int, rules: list[str]
) -> list[dict]:
    """ER / mIoU of ``model`` on ``episodes`` per K-shot rule and episode type (1-shot types once: every
    rule scores one shot alike; the trained rule always)."""
    rows, trained = [], model.config.kshot
    for rule in [trained] + [r for r in rules if r != trained]:
        model.config.kshot = rule
        eps = episodes if rule == trained else episodes[episodes["shot"] > 1]
        workers = scoring_workers(model, threads)
        pred = CSTPredictor.for_targets(model, cell.tokens, cell.targets, 16, workers)
        pred.prefetch(eps, progress=False)
        res = run_episodes(eps, pred, cell.index, classes, void=cell.void, progress=False)
        rows += [{"rule": rule, "setting": k, "er": v["er"], "miou": v["miou"]} for k, v in res.items()]
    model.config.kshot = trained
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cell_arguments(ap)
    ap.add_argument("--vs", action="append", default=[], help="one run's overrides (k=v,k2=v2)")
    ap.add_argument("--out", required=True, help="CSV of every run's test scores")
    ap.add_argument(
        "--features",
        help="another feature store of the same images (e.g. bf16 extraction; --params must match)",
    )
    ap.add_argument(
        "--rule", action="append", choices=KSHOT_RULES, help="K-shot rules to score besides the trained one"
    )
    args = ap.parse_args()
    config = validate(read_params(args.params))
    base = merged(asdict(config.train.for_supervision(args.supervision)), parse_overrides(",".join(args.set)))
    paths = pipeline_paths(config.need("dataset").name)
    if args.features:
        paths["features"] = args.features
    folds = read_folds(paths["folds"])
    test = read_episodes(Path(paths["episodes"]) / "test.parquet")
    rows = []
    for fold in args.fold:
        cell = load_cell(config, args.supervision, fold, paths)
        episodes = test[test["fold"] == fold].reset_index(drop=True)
        classes = fold_classes(folds, fold, "test")
        for spec in args.vs or [""]:
            cfg = TrainConfig.from_params(merged(base, parse_overrides(spec)))
            t0 = time.perf_counter()
            result = train_cell(cell, cfg, progress=False)
            seconds = time.perf_counter() - t0
            with torch.inference_mode():
                scores = score_test(cell, result.model, episodes, classes, int(cfg.threads), args.rule or [])
            for r in scores:
                rows.append(
                    {"fold": fold, "run": spec or "base", "epoch": result.best_epoch, "train_s": seconds, **r}
                )
                print(rows[-1], flush=True)
            pd.DataFrame(rows).to_csv(args.out, index=False)  # after every run: a cut-short run keeps rows


if __name__ == "__main__":
    main()
