"""Stage `evaluate@{supervision}-{fold}`: score a CST checkpoint on the fixed TEST episodes of a fold.

    python -m stages.evaluate --supervision image --fold 0 --checkpoint models/cst/image/fold0.pt
        --index data/index/msrc.parquet --folds data/episodes/msrc/folds.json --episodes data/episodes/msrc
        --features data/features/msrc.h5 --pseudo data/pseudo/msrc.h5 --enhancer models/enhancer.pt
        --out reports/eval/image/fold0.json

Every (way, shot) of ``<episodes>/test.parquet`` for the fold is run through
`fscs.evaluation.episodes.run_episodes`
with a `CSTPredictor` (pairs independent, K shots averaged). Test-time support masks follow the setting: GT
for ``pixel``, the raw self pseudo-mask for ``image``, the enhanced self pseudo-mask for ``mixed``
(``--enhancer``). Masks are made at the checkpoint's ``label_size``.

Cross-dataset: point ``--index``, ``--folds``, ``--episodes``, ``--features`` (and ``--pseudo``, optional:
self maps are recomputed from the store without it) at another dataset's artifacts; the store must come from
the backbone the checkpoint was trained on (same name, weights, input size, layers), else the stage stops
with the attribute that differs.
"""

from __future__ import annotations

import time
from pathlib import Path

from fscs.config.params import checkpoint_label_size, load_config
from fscs.config.supervision import SUPERVISIONS
from fscs.core.errors import FscsError
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

    config = load_config(args.params)
    params = config.params()
    void = config.evaluate.void
    threads = config.train.threads
    batch_size = args.batch_size or config.train.eval_batch_size

    import torch

    from fscs.core.allocator import keep_freed_memory
    from fscs.core.device import describe, resolve_device
    from fscs.data.episodes import read_episodes
    from fscs.data.folds import class_names, fold_classes, read_folds
    from fscs.data.index import read_index
    from fscs.evaluation.episodes import evaluation_json, run_episodes
    from fscs.features.store import FeatureStore
    from fscs.learn.model.cst import load_checkpoint, read_checkpoint
    from fscs.learn.predictor import CSTPredictor, TokenBank, scoring_workers
    from fscs.learn.targets import targets_for

    device = resolve_device()
    keep_freed_memory()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    ckpt = read_checkpoint(args.checkpoint)
    trained_as = ckpt.get("supervision")
    if trained_as is not None and trained_as != args.supervision:
        raise FscsError(
            f"{args.checkpoint}: trained with supervision '{trained_as}', evaluated as '{args.supervision}'"
        )
    label_size = checkpoint_label_size(ckpt, args.checkpoint)
    index = read_index(args.index)
    folds = read_folds(args.folds)
    classes = fold_classes(folds, args.fold, "test")
    test_path = Path(args.episodes) / "test.parquet"
    episodes = read_episodes(test_path)
    episodes = episodes[episodes["fold"] == args.fold].reset_index(drop=True)
    if episodes.empty:
        raise FscsError(f"{test_path}: no test episodes for fold {args.fold}")

    t0 = time.perf_counter()
    with FeatureStore(args.features) as store:
        model, _ = load_checkpoint(args.checkpoint, store=store)
        model.to(device)
        if args.supervision == "mixed" and not args.enhancer:
            raise FscsError("supervision 'mixed' needs --enhancer (its test support masks are enhanced)")
        enhancer_fold = ckpt.get("fold", args.fold)  # cross-dataset: the enhancer of the checkpoint's fold
        targets = targets_for(
            args.supervision,
            params,
            store,
            index,
            label_size,
            fold=enhancer_fold,
            pseudo=args.pseudo,
            enhancer=args.enhancer,
            for_training=False,
            class_names=class_names(folds),
        )
        ids = [str(i) for i in episodes["query_id"]]
        ids += [str(s) for ss in episodes["support_ids"] for shots in ss for s in shots]
        missing = sorted({i for i in ids if i not in store})
        if missing:
            raise FscsError(
                f"{args.features}: {len(missing)} episode images are not in the store (first: {missing[0]!r})"
            )
        tokens = TokenBank(store, ids, progress=None)
        predictor = CSTPredictor(
            model,
            tokens,
            targets.test_support_mask,
            targets.test_mask_depends_on_class,
            batch_size=batch_size,
            workers=scoring_workers(model, threads),
        )
        pairs = predictor.prefetch(episodes, progress=None)
        results = run_episodes(episodes, predictor, index, classes, void=void, progress=None)
    seconds = time.perf_counter() - t0
    doc = evaluation_json(args.fold, args.supervision, void, results)
    doc["run"] = {
        "pairs": int(pairs),
        "seconds": round(seconds, 1),
        "checkpoint_epoch": ckpt.get("epoch"),
        "device": describe(device),
    }
    write_json(args.out, doc)
    summary = "; ".join(f"{k} ER {v['er']} mIoU {v['miou']}" for k, v in doc["results"].items())
    print(f"evaluate {args.supervision} fold {args.fold}: {summary} ({pairs} pairs, {seconds:.0f}s)")


if __name__ == "__main__":
    run_stage(main)
