"""Stage `train@{supervision}-{fold}`: train one CST model from the feature store.

    python -m stages.train --supervision image --fold 0 --index data/index/msrc.parquet
        --folds data/episodes/msrc/folds.json --episodes data/episodes/msrc --features data/features/msrc.h5
        --pseudo data/pseudo/msrc.h5 --enhanced data/pseudo/msrc-enhanced.h5 --enhancer models/enhancer.pt
        --out models/cst/image/fold0.pt --curve reports/curves/image-fold0.csv

Reads only stored tokens (the backbone never runs); the tokens of every image the fold's training and
validation episodes can touch are loaded into RAM once. Params: ``train`` (schedule, loss, ``label_size``,
``model`` overrides), ``pseudo`` (recipe and threshold of the pseudo-labels), ``backbone`` (the store must
match), ``evaluate.void``. Model selection uses the fold's 1-way 1-shot validation episodes
(``<episodes>/val.parquet``, train split, training classes), never the test episodes.
Writes the checkpoint (``fscs.learn.model.cst``) and the learning curve CSV
(``fscs.learn.train.CURVE_COLUMNS``: step,
learning rate, loss, validation ER / mIoU and the threshold-free pixel signals, seconds).
"""

from __future__ import annotations

import csv
import io
from typing import Any

from fscs.config.params import load_config
from fscs.config.supervision import SUPERVISIONS
from fscs.core.io import atomic_path
from stages._common import run_stage, stage_parser


def add_data_arguments(parser: Any, out_help: str) -> None:
    parser.add_argument("--supervision", required=True, choices=SUPERVISIONS)
    parser.add_argument("--fold", required=True, type=int)
    parser.add_argument("--index", required=True, help="image index (data/index/<ds>.parquet)")
    parser.add_argument("--folds", required=True, help="folds file (data/episodes/<ds>/folds.json)")
    parser.add_argument("--episodes", required=True, help="episode folder holding val.parquet / test.parquet")
    parser.add_argument("--features", required=True, help="feature store (data/features/<ds>.h5)")
    parser.add_argument("--pseudo", help="pseudo-label file (data/pseudo/<ds>.h5); image and mixed settings")
    parser.add_argument("--enhanced", help="enhanced pseudo-label file (labelled subset); mixed setting")
    parser.add_argument("--enhancer", help="enhancer checkpoint (models/enhancer.pt); mixed setting")
    parser.add_argument("--out", required=True, help=out_help)


def curve_csv(rows: list[dict[str, Any]]) -> str:
    from fscs.learn.train import CURVE_COLUMNS

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CURVE_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CURVE_COLUMNS})
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    add_data_arguments(parser, "checkpoint to write (models/cst/<supervision>/fold<f>.pt)")
    parser.add_argument("--curve", required=True, help="learning curve CSV to write")
    args = parser.parse_args(argv)

    config = load_config(args.params)
    cfg = config.train.for_supervision(args.supervision)

    import torch

    from fscs.core.allocator import keep_freed_memory
    from fscs.core.device import resolve_device
    from fscs.learn.cell import load_cell
    from fscs.learn.train import train_cell

    device = resolve_device()  # a bad FSCS_DEVICE stops here, before the tokens load
    keep_freed_memory()
    torch.set_num_threads(int(cfg.threads))
    paths = {k: getattr(args, k) for k in ("index", "folds", "episodes", "features", "pseudo", "enhanced")}
    cell = load_cell(config, args.supervision, args.fold, {**paths, "enhancer": args.enhancer})

    def report(row: dict[str, Any]) -> None:
        print(
            f"epoch {row['epoch']}: loss {row['train_loss']:.4f}  val ER {row.get('val_er')}  "
            f"val mIoU {row.get('val_miou')}  AUC {row.get('val_auc')}  ({row['seconds']:.0f}s)",
            flush=True,
        )

    with cell.store:
        result = train_cell(cell, cfg, on_epoch=report, device=device)
    from dataclasses import asdict

    from fscs.learn.model.cst import count_parameters, save_checkpoint
    from fscs.learn.targets import labeler_kwargs

    save_checkpoint(
        args.out,
        result.model,
        config_extra={
            "label_size": int(cfg.label_size),
            "supervision": args.supervision,
            "pseudo": {
                k: v
                for k, v in labeler_kwargs(config.pseudo).items()
                if isinstance(v, int | float | str | bool)
            },
        },
        fold=int(args.fold),
        supervision=args.supervision,
        epoch=int(result.best_epoch),
        val_miou=result.best_val_miou,
        train={k: v for k, v in asdict(cfg).items() if k not in ("model", "by_supervision")},
        curve=result.curve,
        device=result.device,
    )
    with atomic_path(args.curve) as tmp:
        tmp.write_text(curve_csv(result.curve))
    n_params = count_parameters(result.model)
    print(
        f"train {args.supervision} fold {args.fold}: {len(result.curve)} epochs in {result.seconds:.0f}s, "
        f"best epoch {result.best_epoch} (val mIoU {result.best_val_miou}), {n_params} params, "
        f"{result.device} -> {args.out}"
    )


if __name__ == "__main__":
    run_stage(main)
