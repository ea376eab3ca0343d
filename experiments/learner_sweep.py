"""Measured runs of the CST learner: train one (supervision, fold) cell under several `train` overrides in one
process (tokens and targets loaded once) and print each run's learning curve on VALIDATION episodes.

    python -m experiments.learner_sweep --supervision pixel --fold 0 \
        --set epochs=8 --set batch_size=4 --vs "init=he" --vs "init=he,schedule=cosine,warmup=0.1"

``--set k=v`` applies to every run; each ``--vs`` is one run's extra overrides (``model.init=he`` reaches
``train.model``). Values are parsed as YAML. Never reads the test episodes. Results go to stdout and, with
``--out``, to a CSV (one row per run and epoch) so a sweep is kept with its numbers. ``--holdout 4`` trains
on 3 of every 4 training classes and validates on the fourth (`experiments.holdout`): novel-class ranking;
``--inner-test 4`` selects on the other classes' validation episodes and scores the fourth once at the end.
"""

from __future__ import annotations

import argparse
import copy
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from experiments.holdout import episode_classes, holdout_cell, inner_split, score_inner
from fscs.config.params import TrainConfig, read_params, validate
from fscs.config.paths import pipeline_paths
from fscs.learn.cell import load_cell
from fscs.learn.train import train_cell


def parse_overrides(text: str) -> dict[str, Any]:
    """'a=1,model.init=he,shots=[1,5]' -> {'a': 1, 'model': {'init': 'he'}, 'shots': [1, 5]} (a comma inside
    brackets belongs to the value)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in re.split(r",(?![^\[]*\])", text))):
        key, _, value = part.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merged(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def kshot_scores(cell: Any, model: Any, name: str) -> dict[str, float]:
    """ER / mIoU of the trained model on the fold's 1-way and 2-way 5-shot validation episodes, per K-shot
    rule (`fscs.config.cst.KSHOT_RULES`); the model keeps the rule it was trained with."""
    from fscs.config.cst import KSHOT_RULES
    from fscs.data.episodes import read_episodes
    from fscs.evaluation.episodes import run_episodes
    from fscs.learn.predictor import CSTPredictor

    val = read_episodes(Path(pipeline_paths(name)["episodes"]) / "val.parquet")
    val = val[(val["fold"] == cell.fold) & (val["shot"] == 5)].reset_index(drop=True)
    out, trained = {}, model.config.kshot
    for rule in KSHOT_RULES:
        model.config.kshot = rule
        t = cell.targets
        pred = CSTPredictor(model, cell.tokens, t.test_support_mask, t.test_mask_depends_on_class)
        res = run_episodes(val, pred, cell.index, cell.train_classes, void=cell.void, progress=False)
        for setting, r in res.items():
            out[f"{rule}_{setting}_er"], out[f"{rule}_{setting}_miou"] = r["er"], r["miou"]
    model.config.kshot = trained
    return out


def cell_arguments(ap: argparse.ArgumentParser) -> None:
    """The options that pick the cells and the train overrides every run shares (this sweep, spread)."""
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--supervision", required=True, choices=("image", "mixed", "pixel"))
    ap.add_argument("--fold", type=int, action="append", required=True)
    ap.add_argument("--set", action="append", default=[], help="override for every run (k=v)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cell_arguments(ap)
    ap.add_argument("--pset", action="append", default=[], help="params override (section.k=v) for the cell")
    ap.add_argument("--vs", action="append", default=[""], help="one run's overrides (k=v,k2=v2)")
    ap.add_argument("--out", help="CSV of every run's curve")
    ap.add_argument(
        "--kshot-check", action="store_true", help="also score 1-way 5-shot val episodes per rule"
    )
    ap.add_argument(
        "--holdout",
        type=int,
        default=0,
        metavar="EVERY",
        help="validate on every EVERY-th training class, held out of training (experiments.holdout)",
    )
    ap.add_argument(
        "--inner-test",
        type=int,
        default=0,
        metavar="EVERY",
        help="hold out every EVERY-th training class; select on the others, score the held-out at the end",
    )
    ap.add_argument("--holdout-episodes", type=int, default=200, help="held-out episodes")
    ap.add_argument(
        "--no-pseudo-file", action="store_true", help="recompute self maps from the store (no pseudo .h5)"
    )
    args = ap.parse_args()
    if (args.holdout or args.inner_test) and args.kshot_check:
        ap.error("--kshot-check reads the pipeline's validation episodes: not with --holdout / --inner-test")
    if args.holdout and args.inner_test:
        ap.error("--holdout or --inner-test, not both")
    config = validate(merged(read_params(args.params), parse_overrides(",".join(args.pset))))
    # the setting's own train config (train.by_supervision applied), then the sweep's overrides on top
    resolved = asdict(config.train.for_supervision(args.supervision))
    base = merged(resolved, parse_overrides(",".join(args.set)))
    runs = args.vs[1:] or [""]
    rows = []
    for fold in args.fold:
        paths = pipeline_paths(config.need("dataset").name)
        cell = load_cell(
            config, args.supervision, fold, {**paths, "pseudo": None} if args.no_pseudo_file else paths
        )
        if args.holdout:
            cell = holdout_cell(cell, args.holdout, args.holdout_episodes, config.episodes.seed)
            print(f"fold {fold}: validating on held-out classes {cell.val_classes}", flush=True)
        inner = None
        if args.inner_test:
            cell, inner = inner_split(cell, args.inner_test, args.holdout_episodes, config.episodes.seed)
            print(f"fold {fold}: inner test on held-out classes {episode_classes(inner)}", flush=True)
        for spec in runs:
            section = merged(base, parse_overrides(spec))
            result = train_cell(cell, TrainConfig.from_params(section), progress=False)
            extra = kshot_scores(cell, result.model, config.need("dataset").name) if args.kshot_check else {}
            if inner is not None:
                extra = score_inner(cell, result.model, inner)
                print(f"fold {fold} [{spec or 'base'}] inner test: {extra}", flush=True)
            for r in result.curve:
                rows.append(
                    {
                        "supervision": args.supervision,
                        "fold": fold,
                        "run": spec or "base",
                        "holdout": args.holdout or args.inner_test,
                        **r,
                        **extra,
                    }
                )
            if args.kshot_check:
                print(f"fold {fold} [{spec or 'base'}] val 5-shot: {extra}", flush=True)
            if args.out:  # after every run, so a sweep cut short keeps what it measured
                pd.DataFrame(rows).to_csv(args.out, index=False)
            last = result.curve[-1]
            print(
                f"fold {fold} [{spec or 'base'}] best epoch {result.best_epoch} "
                f"val mIoU {result.best_val_miou} | last: ER {last.get('val_er')} "
                f"AUC {last.get('val_auc')} bestIoU {last.get('val_best_iou')} | {result.seconds:.0f}s",
                flush=True,
            )
            print(
                pd.DataFrame(result.curve)
                .drop(columns=["val_best_threshold"], errors="ignore")
                .to_string(index=False),
                flush=True,
            )


if __name__ == "__main__":
    main()
