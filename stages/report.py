"""Stage `report`: fold means per setting -> reports/metrics.json, summary.json, README.md and figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from fscs.config.params import Config, load_config
from fscs.core.errors import FscsError
from fscs.core.io import atomic_path, write_json
from fscs.data.index import read_index
from fscs.features.online import open_features
from fscs.report.study import load_eval_dir, markdown_report, metrics_json, summarise, summary_json
from stages._common import run_stage, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--eval-dir", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--episodes", required=True, help="folder with test.parquet")
    parser.add_argument("--features", required=True)
    parser.add_argument("--models", required=True, help="folder with <supervision>/fold<f>.pt")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--summary", required=True)
    parser.add_argument("--readme", required=True)
    parser.add_argument("--figures", required=True)
    parser.add_argument(
        "--variants", help="folder of JSON records of other measured learner variants (reports/variants/)"
    )
    args = parser.parse_args(argv)

    config = load_config(args.params)
    study = config.study
    missing = [
        str(Path(args.eval_dir) / s / f"fold{f}.json")
        for s in study.supervisions
        for f in study.folds
        if not (Path(args.eval_dir) / s / f"fold{f}.json").is_file()
    ]
    if missing:
        raise FscsError(f"evaluation files missing (run dvc repro evaluate): {', '.join(missing)}")

    summary = summarise(load_eval_dir(args.eval_dir, study.supervisions, study.folds))
    with open_features(args.features, config, read_index(args.index), check=False) as store:
        attrs = store.attrs
    test = pd.read_parquet(Path(args.episodes) / "test.parquet", columns=["fold", "way", "shot"])
    per_kind = int(test.groupby(["fold", "way", "shot"]).size().max())

    figures = qualitative_figures(args, config)
    readme_dir = Path(args.readme).parent
    context = {
        "dataset": config.need("dataset").name,
        "backbone": attrs["backbone"],
        "input_size": int(attrs["input_size"]),
        "grid": "x".join(str(int(g)) for g in attrs["grid"]),
        "folds": ", ".join(str(f) for f in study.folds),
        "episodes": per_kind,
        "void": config.evaluate.void,
        "figures": [str(Path(f).resolve().relative_to(readme_dir.resolve())) for f in figures],
        "variants": variant_records(args.variants, config.need("dataset").name),
    }
    write_json(args.metrics, metrics_json(summary))
    write_json(args.summary, summary_json(summary, study.compare))
    with atomic_path(args.readme) as tmp:
        tmp.write_text(markdown_report(summary, context))
    lead = summary[study.compare].get("1way1shot", {})
    print(
        f"report: {len(summary)} settings x {len(study.folds)} folds; {study.compare} 1way1shot "
        f"ER {lead.get('er', float('nan')):.1f} mIoU {lead.get('miou', float('nan')):.1f} -> {args.readme}"
    )


def variant_records(folder: str | None, dataset: str) -> list[dict]:
    """The committed variant records for this dataset, by file name (none without the folder)."""
    if not folder or not Path(folder).is_dir():
        return []
    records = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    return [r for r in records if r.get("dataset") == dataset]


def qualitative_figures(args: argparse.Namespace, config: Config) -> list[str]:
    """Query | GT | prediction per setting for a few fixed test episodes of the first fold."""
    from fscs.report.figures import prediction_grid

    return prediction_grid(
        models_dir=args.models,
        index_path=args.index,
        episodes_dir=args.episodes,
        features_path=args.features,
        supervisions=config.study.supervisions,
        fold=config.study.folds[0],
        config=config,
        out_dir=args.figures,
    )


if __name__ == "__main__":
    run_stage(main)
