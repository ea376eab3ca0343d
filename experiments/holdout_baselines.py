"""The training-free baselines on the held-out validation episodes of `experiments.holdout`, so a learner
measured there has its references on the same episodes (never the test split).

    python -m experiments.holdout_baselines --fold 0 --fold 1 [--every 4] [--episodes 200] [--out CSV]

Each baseline is calibrated, as in the baselines stage, on the pipeline's validation episodes, here only
those whose classes are all kept for training (the held-out classes stay unseen), then scored on the
held-out episodes: like for like with the learner's inner test (`learner_sweep --inner-test`), not with
`--holdout`, whose epoch and thresholds are chosen on the held-out episodes themselves.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pandas as pd

from experiments.holdout import draw_held_out, held_out_classes, kept_classes
from fscs.config.params import load_config
from fscs.config.paths import pipeline_paths
from fscs.core.memory import budget_bytes
from fscs.data.folds import class_names, read_folds, training_classes
from fscs.data.index import read_index
from fscs.evaluation.baselines import run_baselines
from fscs.evaluation.episodes import load_episodes
from fscs.features.store import FeatureStore, expected_attrs
from fscs.learn.targets import complement_classes
from fscs.pseudo.attention import Labeler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--fold", type=int, action="append", required=True)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--out", help="CSV, one row per (fold, baseline)")
    args = ap.parse_args()
    config = load_config(args.params)
    paths = pipeline_paths(config.need("dataset").name)
    index, folds = read_index(paths["index"]), read_folds(paths["folds"])
    cfg = config.evaluate.baselines
    rows = []
    with FeatureStore(paths["features"], expect=expected_attrs(config.need("backbone"))) as store:
        labeler = Labeler.from_config(store, config.pseudo, pseudo_path=paths["pseudo"])
        for fold in args.fold:
            train = training_classes(folds, fold)
            held = held_out_classes(train, fold, args.every)
            kept = kept_classes(train, fold, args.every)
            seed = config.episodes.seed
            episodes = draw_held_out(
                index, train, fold, str(folds["train_split"]), args.every, args.episodes, seed
            )
            val = load_episodes(Path(paths["episodes"]) / "val.parquet", fold=fold)
            keep = val["support_classes"].map(set(kept).issuperset)
            val = val[keep].reset_index(drop=True)
            inner = copy.deepcopy(folds)
            inner["folds"][str(fold)] = {"test": held, "train": kept}
            out = run_baselines(
                list(cfg.names),
                fold,
                episodes,
                val,
                index,
                inner,
                store,
                labeler,
                void=config.evaluate.void,
                layer=cfg.layer,
                gate=cfg.gate,
                stats=list(cfg.presence_stats),
                token_bytes=budget_bytes(config.memory.tokens_mb, "tokens"),
                progress=False,
                complement=complement_classes(config.pseudo, class_names(folds)),
            )
            for name, res in out["baselines"].items():
                r = res["1way1shot"]
                rows.append({"fold": fold, "baseline": name, "held_out": held, **r})
                print(f"fold {fold} held out {held}: {name} ER {r['er']} mIoU {r['miou']}", flush=True)
    if args.out:
        pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
