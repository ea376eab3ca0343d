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

import numpy as np
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
    rows, trained, own = [], model.config.kshot, dict(model.config.shot_thresholds)
    for rule in [trained] + [r for r in rules if r != trained]:
        model.config.kshot = rule
        eps = episodes if rule == trained else episodes[episodes["shot"] > 1]
        workers = scoring_workers(model, threads)
        pred = CSTPredictor.for_targets(model, cell.tokens, cell.targets, 16, workers)
        pred.prefetch(eps, progress=False)
        res = run_episodes(eps, pred, cell.index, classes, void=cell.void, progress=False)
        rows += [{"rule": rule, "setting": k, "er": v["er"], "miou": v["miou"]} for k, v in res.items()]
        if own:  # the same weights (and cached scores) with the 1-shot thresholds for every shot count
            model.config.shot_thresholds = {}
            kshot = eps[eps["shot"] > 1]
            res = run_episodes(kshot, pred, cell.index, classes, void=cell.void, progress=False)
            rows += [
                {"rule": f"{rule}+1shot_thresholds", "setting": k, "er": v["er"], "miou": v["miou"]}
                for k, v in res.items()
            ]
            model.config.shot_thresholds = own
    model.config.kshot = trained
    return rows


def split_half_check(cell, model, threads: int) -> list[dict]:
    """Validation only: ER / mIoU on each half of the fold's 1-way K-shot validation episodes (even / odd
    rows) with thresholds calibrated on the other half, against the model's 1-shot thresholds on the same
    rows; what per-shot-count thresholds gain on episodes they were not chosen on."""
    from fscs.learn.calibration import Records, calibrate, episode_scores
    from fscs.learn.train import uncalibrated, validation_records

    if cell.val_kshot is None or cell.val_kshot.empty:
        return []
    base = (model.config.presence_threshold, model.config.fg_threshold)
    own = dict(model.config.shot_thresholds)
    uncalibrated(model)
    out = []
    for k, rows in cell.val_kshot.groupby("shot"):
        rows = rows.reset_index(drop=True)
        pred = CSTPredictor.for_targets(model, cell.tokens, cell.targets, 16, scoring_workers(model, threads))
        pred.prefetch(rows, progress=False)
        rec = validation_records(pred, cell.targets, rows)
        half = [np.arange(len(rows)) % 2 == i for i in (0, 1)]
        fields = ("classes", "labels", "presence", "fg", "gt")
        part = [Records(*(getattr(rec, f)[h] for f in fields)) for h in half]
        classes = cell.train_classes if cell.val_classes is None else cell.val_classes
        scores = {"1shot_thresholds": [], "other_half": []}
        for i in (0, 1):
            cal = calibrate(part[1 - i], classes)
            scores["other_half"].append(
                episode_scores(part[i], cal["presence_threshold"], cal["fg_threshold"], classes)
            )
            scores["1shot_thresholds"].append(episode_scores(part[i], *base, classes))
        for name, v in scores.items():
            er, miou = np.mean(v, axis=0)
            out.append({"rule": f"val_{name}", "setting": f"val1way{k}shot", "er": er, "miou": miou})
    model.config.presence_threshold, model.config.fg_threshold = base
    model.config.shot_thresholds = own
    return out


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
                scores += split_half_check(cell, result.model, int(cfg.threads))
            for r in scores:
                rows.append(
                    {"fold": fold, "run": spec or "base", "epoch": result.best_epoch, "train_s": seconds, **r}
                )
                print(rows[-1], flush=True)
            pd.DataFrame(rows).to_csv(args.out, index=False)  # after every run: a cut-short run keeps rows


if __name__ == "__main__":
    main()
