"""Stage `baselines@{fold}`: training-free references scored on the fold's fixed test episodes.

    python -m stages.baselines --fold 0 --index data/index/msrc.parquet --folds data/episodes/msrc/folds.json
        --episodes data/episodes/msrc --features data/features/msrc.h5 --pseudo data/pseudo/msrc.h5
        --out reports/eval/baselines/fold0.json [--params params.yaml]

Baselines (``fscs.evaluation.baselines``): ``attention`` (raw support-CLS attention on the query),
``prototype`` (masked-prototype matcher with the support's self pseudo-mask) and ``prototype_gt`` (the same
with the GT support mask). Thresholds are calibrated on ``<episodes>/val.parquet`` (training split and
classes) only. Params: ``evaluate.void`` and ``evaluate.baselines`` (names, layer, presence_stats, gate);
``pseudo`` for the support pseudo-masks; ``backbone`` to check the feature store; ``memory.tokens_mb`` bounds
the token cache (not a DVC param: it changes no number).
"""

from __future__ import annotations

import os
import time

from fscs.config.params import load_config
from fscs.core.io import write_json
from fscs.core.memory import budget_bytes
from fscs.data.folds import class_names, read_folds
from fscs.data.index import read_index
from fscs.evaluation.baselines import run_baselines
from fscs.evaluation.episodes import load_episodes
from fscs.features.online import open_features
from fscs.learn.targets import complement_classes
from fscs.pseudo.attention import Labeler
from stages._common import run_stage, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--index", required=True, help="image index (parquet)")
    parser.add_argument("--folds", required=True, help="folds.json")
    parser.add_argument("--episodes", required=True, help="folder with test.parquet and val.parquet")
    parser.add_argument("--features", required=True, help="feature store (HDF5)")
    parser.add_argument("--pseudo", required=True, help="pseudo-label file (HDF5)")
    parser.add_argument("--out", required=True, help="output JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    config = load_config(args.params)
    void, cfg = config.evaluate.void, config.evaluate.baselines
    index = read_index(args.index)
    folds = read_folds(args.folds)
    test = load_episodes(os.path.join(args.episodes, "test.parquet"), fold=args.fold)
    val = load_episodes(os.path.join(args.episodes, "val.parquet"), fold=args.fold)
    with open_features(args.features, config, index) as store:
        labeler = Labeler.from_config(store, config.pseudo, pseudo_path=args.pseudo)
        out = run_baselines(
            list(cfg.names),
            args.fold,
            test,
            val,
            index,
            folds,
            store,
            labeler,
            void=void,
            layer=cfg.layer,
            gate=cfg.gate,
            stats=list(cfg.presence_stats),
            token_bytes=budget_bytes(config.memory.tokens_mb, "tokens"),
            progress=not args.quiet,
            complement=complement_classes(config.pseudo, class_names(folds)),
        )
    write_json(args.out, out)
    summary = ", ".join(
        f"{name} {key} ER {r['er']} mIoU {r['miou']}"
        for name, res in out["baselines"].items()
        for key, r in list(res.items())[:1]
    )
    print(f"baselines: fold {args.fold}: {summary}; {time.perf_counter() - start:.1f}s -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
