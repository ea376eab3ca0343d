"""Stage `evaluate@{supervision}-{fold}`: score a CST checkpoint on the fixed TEST episodes of a fold.

    python -m stages.evaluate --supervision image --fold 0 --checkpoint models/cst/image/fold0.pt
        --index data/index/msrc.parquet --folds data/episodes/msrc/folds.json --episodes data/episodes/msrc
        --features data/features/msrc.h5 --pseudo data/pseudo/msrc.h5 --enhancer models/enhancer.pt
        --out reports/eval/image/fold0.json

Every (way, shot) of ``<episodes>/test.parquet`` for the fold is run through
`fscs.evaluation.learner.evaluate_checkpoint` with a `CSTPredictor` (pairs independent, K shots
averaged). Test-time support masks follow the setting: GT for ``pixel``, the raw self pseudo-mask
for ``image``, the enhanced self pseudo-mask for ``mixed`` (``--enhancer``). Masks are made at the
checkpoint's ``label_size``.

Cross-dataset: point ``--index``, ``--folds``, ``--episodes``, ``--features`` (and ``--pseudo``, optional:
self maps are recomputed from the store without it) at another dataset's artifacts; the store must come from
the backbone the checkpoint was trained on (same name, weights, input size, layers), else the stage stops
with the attribute that differs.
"""

from __future__ import annotations

from fscs.config.params import load_config
from fscs.config.supervision import SUPERVISIONS
from fscs.core.io import write_json
from stages._common import run_stage, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--supervision", required=True, choices=SUPERVISIONS)
    parser.add_argument("--fold", required=True, type=int)
    parser.add_argument("--checkpoint", required=True, help="CST checkpoint (models/cst/<sup>/fold<f>.pt)")
    parser.add_argument("--index", required=True)
    parser.add_argument("--folds", required=True)
    parser.add_argument("--episodes", required=True, help="episode folder holding test.parquet")
    parser.add_argument("--features", required=True)
    parser.add_argument("--pseudo", help="pseudo-label file (optional: self maps recomputed from the store)")
    parser.add_argument("--enhancer", help="enhancer checkpoint; required for the mixed setting")
    parser.add_argument("--out", required=True, help="evaluation JSON to write")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per forward pass")
    args = parser.parse_args(argv)

    from fscs.evaluation.learner import evaluate_checkpoint

    paths = {k: getattr(args, k) for k in ("index", "folds", "episodes", "features", "pseudo", "enhancer")}
    config = load_config(args.params)
    doc = evaluate_checkpoint(config, args.supervision, args.fold, args.checkpoint, paths, args.batch_size)
    write_json(args.out, doc)
    summary = "; ".join(f"{k} ER {v['er']} mIoU {v['miou']}" for k, v in doc["results"].items())
    pairs, seconds = doc["run"]["pairs"], doc["run"]["seconds"]
    print(f"evaluate {args.supervision} fold {args.fold}: {summary} ({pairs} pairs, {seconds:.0f}s)")


if __name__ == "__main__":
    run_stage(main)
