"""The spread table from `experiments.spread` CSVs: per run its fold-mean test mIoU per episode type, its
5-shot lead over the GT-mask prototype on the same folds and its 1 -> 5-shot gain (1-way), in Markdown.

    python -m experiments.spread_table spread.csv seeds.csv --rule joint --metrics reports/metrics.json

The prototype's per-fold numbers come from ``--metrics`` (the report stage's ``baseline_prototype_gt``), so a
run on a subset of folds is compared with the prototype on that subset.
"""

from __future__ import annotations

import argparse
import json

import pandas as pd

TYPES = ("1way1shot", "1way5shot", "2way1shot", "2way5shot")


def prototype_frame(metrics: dict) -> pd.DataFrame:
    """(fold, setting) -> the GT-mask prototype's test mIoU."""
    folds = metrics["baseline_prototype_gt"]["folds"]
    rows = [{"fold": int(f), "setting": t, "miou": v[t]["miou"]} for f, v in folds.items() for t in TYPES]
    return pd.DataFrame(rows)


def spread_rows(runs: pd.DataFrame, proto: pd.DataFrame, rule: str | None) -> pd.DataFrame:
    """One row per run: folds, fold-mean mIoU per type, 5-shot leads over the prototype and 1-way gains.
    1-shot types are scored once per run (under the trained rule), so ``rule`` picks only 5-shot rows; a run
    that did not score ``rule`` is left out."""
    out = []
    for run, df in runs.groupby("run", sort=False):
        trained = df.groupby("fold")["rule"].first()  # the trained rule is scored first
        keep = df["rule"] == df["fold"].map(trained)
        if rule:
            keep = (df["setting"].str.endswith("1shot") & keep) | (df["rule"] == rule)
        df = df[keep]
        if set(df["setting"]) != set(TYPES):
            continue  # this run did not score every type under ``rule``
        folds = sorted(df["fold"].unique())
        mean = df.groupby("setting")["miou"].mean()
        p = proto[proto["fold"].isin(folds)].groupby("setting")["miou"].mean()
        row = {"run": run, "folds": ", ".join(str(f) for f in folds)}
        row.update({t: round(mean[t], 1) for t in TYPES})
        row["lead 1w5s"] = round(mean["1way5shot"] - p["1way5shot"], 1)
        row["lead 2w5s"] = round(mean["2way5shot"] - p["2way5shot"], 1)
        row["gain 1w"] = round(mean["1way5shot"] - mean["1way1shot"], 1)
        row["prototype gain 1w"] = round(p["1way5shot"] - p["1way1shot"], 1)
        out.append(row)
    return pd.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", help="experiments.spread CSVs (their runs are listed in order)")
    ap.add_argument("--rule", help="score 5-shot types with this K-shot rule (default: the trained one)")
    ap.add_argument("--metrics", default="reports/metrics.json", help="report metrics with the prototype")
    args = ap.parse_args()
    runs = pd.concat([pd.read_csv(p).fillna({"run": "base"}) for p in args.csv], ignore_index=True)
    with open(args.metrics) as f:
        proto = prototype_frame(json.load(f))
    print(spread_rows(runs, proto, args.rule).to_markdown(index=False))


if __name__ == "__main__":
    main()
