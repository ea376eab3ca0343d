"""How presence rules carry to episodes they were not fitted on: a fold's test episodes (novel classes), the
other folds, and the same episodes on shifted images. 1-way episodes (``--shot``), a setting's trained
checkpoints; thresholds are fitted on the 1-shot validation episodes, as training fits them.

    python -m experiments.presence_transfer --supervision pixel --fold 0 --fold 1 \
        --shifted grayblur=/tmp/shift/grayblur/features.h5 --out presence.csv

Rules, on the model's presence log-odds z(q | s) of a query q against a support s:
- ``abs``: z itself (what the checkpoint's calibrated threshold cuts today);
- ``ref_median`` / ``ref_z``: z minus the median of the support's scores on ``--refs`` reference images drawn
  from the same split (no labels read), or z standardised by their mean and spread
  (`fscs.predict.reference`, what `fscs predict --reference` decides by): how far the query
  stands above images the support is compared with in the same domain;
- ``self``: z minus the support scored against itself.
Per rule and fold: the threshold fitted on the fold's validation episodes (exact search), the test ER at it,
at the threshold fitted on the other folds' validation, at 0 (no fit), and at the test episodes' own best
threshold (oracle, reads test labels: diagnosis only), with the recall of present classes. `--shifted`
stores hold the test images under a shift (`experiments.shifted_images`), same ids and episodes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fscs.config.params import load_config
from fscs.config.paths import pipeline_paths
from fscs.data.episodes import read_episodes
from fscs.features.online import open_features
from fscs.learn.calibration import best_threshold, log_odds
from fscs.learn.cell import load_cell
from fscs.learn.model.cst import load_checkpoint
from fscs.learn.predictor import CSTPredictor, TokenBank, scoring_workers
from fscs.predict.reference import reference_z

RULES = ("abs", "ref_median", "ref_z", "self")


def episode_scores(pred: CSTPredictor, episodes: pd.DataFrame, refs: int, seed: int = 0) -> pd.DataFrame:
    """One row per 1-way episode: its label and its score under every rule (K shots: one joint item, the
    references scored against the same K supports, ``self`` the first support against them)."""
    pool = sorted({str(q) for q in episodes["query_id"]})
    rng = np.random.default_rng(seed)
    items, drawn = [], {}
    for ep in episodes.itertuples():
        shots, c = tuple(str(s) for s in ep.support_ids[0]), int(ep.support_classes[0])
        items.append((str(ep.query_id), shots, c))
        if (shots, c) not in drawn:
            others = [p for p in pool if p not in shots]
            drawn[(shots, c)] = [others[i] for i in rng.choice(len(others), refs, replace=False)]
    keys = list(drawn)
    ref_items = [(r, s, c) for (s, c) in keys for r in drawn[(s, c)]]
    self_items = [(s[0], s, c) for (s, c) in keys]
    z = log_odds(np.array([p[0] for p in pred.pair_scores(items + ref_items + self_items)]))
    zq, zr = z[: len(items)], z[len(items) : len(items) + len(ref_items)].reshape(len(keys), refs)
    zs = z[len(items) + len(ref_items) :]
    at = {k: i for i, k in enumerate(keys)}
    rows = []
    for (_, s, c), ep, v in zip(items, episodes.itertuples(), zq, strict=True):
        i = at[(s, c)]
        rows.append(
            {
                "label": int(ep.labels[0]),
                "abs": v,
                "ref_median": v - np.median(zr[i]),
                "ref_z": float(reference_z(np.array([v]), zr[i][:, None])[0]),
                "self": v - zs[i],
            }
        )
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per rule, fold and test split: thresholds fitted on validation and the ER / recall they give."""
    out = []
    for rule in RULES:
        for fold in sorted(df["fold"].unique()):
            val = df[(df["fold"] == fold) & (df["split"] == "val")]
            other = df[(df["fold"] != fold) & (df["split"] == "val")]
            t_val, acc_val = best_threshold(val[rule].to_numpy(), val["label"].to_numpy())
            t_other = None
            if len(other):
                t_other = best_threshold(other[rule].to_numpy(), other["label"].to_numpy())[0]
            for split in sorted(s for s in df["split"].unique() if s != "val"):
                t = df[(df["fold"] == fold) & (df["split"] == split)]
                s, y = t[rule].to_numpy(), t["label"].to_numpy().astype(bool)
                t_best, acc_best = best_threshold(s, y)

                def er(th: float, s=s, y=y) -> float:
                    return round(100 * float(np.mean((s > th) == y)), 1)

                def recall(th: float, s=s, y=y) -> float:
                    return round(100 * float(np.mean(s[y] > th)), 1)

                out.append(
                    {
                        "rule": rule,
                        "split": split,
                        "fold": int(fold),
                        "t_val": round(t_val, 3),
                        "t_oracle": round(t_best, 3),
                        "val_er": round(100 * acc_val, 1),
                        "er_val_fit": er(t_val),
                        "er_other_folds_fit": er(t_other) if t_other is not None else np.nan,
                        "er_at_0": er(0.0),
                        "er_oracle": round(100 * acc_best, 1),
                        "recall_val_fit": recall(t_val),
                        "recall_at_0": recall(0.0),
                    }
                )
    return pd.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--supervision", required=True, choices=("image", "mixed", "pixel"))
    ap.add_argument("--fold", type=int, action="append", required=True)
    ap.add_argument("--refs", type=int, default=8, help="reference images per support")
    ap.add_argument(
        "--shot",
        type=int,
        default=1,
        help="shots of the test episodes (> 1: joint checkpoints; val stays 1-shot)",
    )
    ap.add_argument("--shifted", action="append", default=[], help="NAME=store of shifted test images")
    ap.add_argument("--out", required=True, help="CSV of the per-episode scores (summary: <out>.summary.csv)")
    args = ap.parse_args()
    config = load_config(args.params)
    paths = pipeline_paths(config.need("dataset").name)
    test_all = read_episodes(Path(paths["episodes"]) / "test.parquet")
    torch.set_num_threads(int(config.train.threads))
    frames = []
    for fold in args.fold:
        cell = load_cell(config, args.supervision, fold, paths)
        stores = []
        try:
            model, _ = load_checkpoint(f"models/cst/{args.supervision}/fold{fold}.pt", store=cell.store)
            workers = scoring_workers(model, int(config.train.threads))
            pred = CSTPredictor.for_targets(model, cell.tokens, cell.targets, 16, workers)
            if args.shot > 1 and model.config.kshot != "joint":
                raise SystemExit(f"--shot {args.shot} scores K supports as one item: needs kshot joint")
            test = test_all[
                (test_all["fold"] == fold) & (test_all["way"] == 1) & (test_all["shot"] == args.shot)
            ]
            runs = [("val", cell.val, pred), ("test", test, pred)]
            for spec in args.shifted:
                name, path = spec.split("=", 1)
                stores.append(open_features(path, config, cell.index, check=False))
                shifted = CSTPredictor.for_targets(model, TokenBank(stores[-1]), cell.targets, 16, workers)
                runs.append((f"test_{name}", test, shifted))
            with torch.inference_mode():
                for split, episodes, p in runs:
                    frames.append(episode_scores(p, episodes, args.refs).assign(fold=fold, split=split))
                    print(f"fold {fold} {split}: {len(episodes)} episodes", flush=True)
        finally:
            cell.store.close()
            for s in stores:
                s.close()
    df = pd.concat(frames, ignore_index=True)
    df.to_csv(args.out, index=False)
    summary = summarise(df)
    summary.to_csv(Path(args.out).with_suffix(".summary.csv"), index=False)
    cols = [c for c in summary.columns if c not in ("rule", "split", "fold")]
    print(summary.groupby(["split", "rule"])[cols].mean().round(2).to_string())


if __name__ == "__main__":
    main()
