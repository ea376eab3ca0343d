"""Which validation episodes should pick a K-shot learner's epoch: the 1-way 1-shot ones alone (the train
stage's rule), or the 1-way 1-shot and 1-way 5-shot ones together (the mean of their calibrated mIoU)?

    python -m experiments.select_shots --supervision pixel --fold 0 --fold 1 --vs "" --vs "seed=1" \
        --out select.csv

Each cell trains every epoch once (``patience: 0``; training never reads validation, so the trajectory is
the one either rule sees) and keeps each epoch's weights (`fscs.learn.train.train`'s ``on_model`` hook) and
its validation records; both rules, with the
recipe's early stopping (``patience``, ``min_epochs``) replayed on their own score, then choose an epoch:

- ``split_half``, validation only: each rule chooses on the even validation rows (1-shot thresholds
  calibrated there) and is scored on the odd ones at those thresholds, and the other way round (mean of
  both); what a rule gains on episodes it did not choose on.
- ``test``: the chosen epoch (thresholds from the full 1-shot validation rows, as training keeps them) on
  the fold's test episodes, to report the choice once it is made.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from experiments.learner_sweep import cell_arguments, merged, parse_overrides
from experiments.spread import score_test
from fscs.config.params import TrainConfig, read_params, validate
from fscs.config.paths import pipeline_paths
from fscs.data.episodes import read_episodes
from fscs.data.folds import fold_classes, read_folds
from fscs.learn.calibration import Records, calibrate, episode_scores
from fscs.learn.cell import load_cell
from fscs.learn.predictor import CSTPredictor, scoring_workers
from fscs.learn.train import improves, train_cell, uncalibrated, validation_records

RULES = {"1shot": (1,), "1shot+5shot": (1, 5)}
FIELDS = ("classes", "labels", "presence", "fg", "gt")


def subset(r: Records, keep: np.ndarray) -> Records:
    return Records(*(getattr(r, f)[keep] for f in FIELDS))


def choose(scores: list[float], patience: int, min_epochs: int) -> int:
    """The epoch (1-based) the train loop keeps for this per-epoch score, its early stopping replayed."""
    best, best_epoch, since = None, 0, 0
    for epoch, s in enumerate(scores, start=1):
        if best_epoch == 0 or improves(s, best):
            best, best_epoch, since = s, epoch, 0
            continue
        since += 1
        if since >= patience > 0 and (best or 0.0) > 0.0 and epoch >= min_epochs:
            break
    return best_epoch


def rule_choice(records: list[dict[int, Records]], shots: tuple[int, ...], classes, cfg) -> int:
    scores = [float(np.mean([calibrate(r[k], classes)["miou"] for k in shots])) for r in records]
    return choose(scores, int(cfg.patience), int(cfg.min_epochs))


def split_half(records: list[dict[int, Records]], classes, cfg) -> list[dict]:
    """Per rule: choose on one half of every validation list, score the other half at that half's
    thresholds; the mean of both directions, per shot count."""
    halves = {k: [np.arange(len(records[0][k].labels)) % 2 == i for i in (0, 1)] for k in records[0]}
    rows = []
    for rule, shots in RULES.items():
        got = {k: [] for k in records[0]}
        for i in (0, 1):
            fit = [{k: subset(r[k], halves[k][i]) for k in r} for r in records]
            epoch = rule_choice(fit, shots, classes, cfg)
            for k in records[0]:
                cal = calibrate(fit[epoch - 1][1], classes)  # the 1-shot thresholds, as training keeps
                held = subset(records[epoch - 1][k], halves[k][1 - i])
                er, miou = episode_scores(held, cal["presence_threshold"], cal["fg_threshold"], classes)
                got[k].append((epoch, er, miou))
        for k, v in got.items():
            epochs, er, miou = zip(*v, strict=True)
            rows.append(
                {"selection": rule, "source": "split_half", "epoch": "/".join(map(str, epochs)),
                 "setting": f"val1way{k}shot", "er": float(np.mean(er)), "miou": float(np.mean(miou))}
            )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cell_arguments(ap)
    ap.add_argument("--vs", action="append", default=[], help="one run's overrides (k=v,k2=v2)")
    ap.add_argument("--out", required=True, help="CSV of every run's validation and test scores")
    args = ap.parse_args()
    config = validate(read_params(args.params))
    base = merged(asdict(config.train.for_supervision(args.supervision)), parse_overrides(",".join(args.set)))
    paths = pipeline_paths(config.need("dataset").name)
    folds = read_folds(paths["folds"])
    test = read_episodes(Path(paths["episodes"]) / "test.parquet")
    rows = []
    for fold in args.fold:
        cell = load_cell(config, args.supervision, fold, paths)
        val = {1: cell.val, 5: cell.val_kshot[cell.val_kshot["shot"] == 5].reset_index(drop=True)}
        classes = cell.train_classes
        for spec in args.vs or [""]:
            cfg = TrainConfig.from_params(merged(base, parse_overrides(spec)))
            records: list[dict[int, Records]] = []
            states: list[dict] = []

            def keep(epoch: int, model, cfg=cfg, cell=cell, val=val, records=records, states=states) -> None:
                snapshot = copy.deepcopy(model).eval()
                uncalibrated(snapshot)
                workers = scoring_workers(snapshot, int(cfg.threads))
                with torch.inference_mode():
                    pred = CSTPredictor.for_targets(snapshot, cell.tokens, cell.targets, 16, workers)
                    for rows_k in val.values():
                        pred.prefetch(rows_k, progress=False)
                    records.append({k: validation_records(pred, cell.targets, r) for k, r in val.items()})
                states.append(copy.deepcopy(model.state_dict()))

            result = train_cell(cell, replace(cfg, patience=0), progress=False, on_model=keep)
            curve = [r["val_miou_cal"] for r in result.curve]
            mine = [calibrate(r[1], classes)["miou"] for r in records]
            assert np.allclose(curve, mine, atol=1e-3), (curve, mine)  # the records are what training saw
            out = split_half(records, classes, cfg)
            episodes = test[test["fold"] == fold].reset_index(drop=True)
            test_classes = fold_classes(folds, fold, "test")
            scored: dict[int, list[dict]] = {}
            for rule, shots in RULES.items():
                epoch = rule_choice(records, shots, classes, cfg)
                if epoch not in scored:
                    model = result.model
                    model.load_state_dict(states[epoch - 1])
                    cal = calibrate(records[epoch - 1][1], classes)
                    model.config.presence_threshold, model.config.fg_threshold = (
                        cal["presence_threshold"], cal["fg_threshold"]
                    )  # fmt: skip
                    with torch.inference_mode():
                        scored[epoch] = score_test(cell, model, episodes, test_classes, int(cfg.threads), [])
                tag = {"selection": rule, "epoch": str(epoch)}
                out += [{**tag, "source": "test", **r} for r in scored[epoch]]
                val_scores = {k: calibrate(records[epoch - 1][k], classes) for k in val}
                out += [
                    {**tag, "source": "val_full", "setting": f"val1way{k}shot", **v}
                    for k, v in val_scores.items()
                ]
            for r in out:
                rows.append({"fold": fold, "run": spec or "base", **r})
                print(rows[-1], flush=True)
            pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
