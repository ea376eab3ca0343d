"""Stage `prepare`: dataset folder + params -> image index, folds and the fixed test/validation episodes.

    python -m stages.prepare --index data/index/msrc.parquet --episodes data/episodes/msrc [--params ...]

Writes `<index>` and `<episodes>/folds.json`, `<episodes>/test.parquet`, `<episodes>/val.parquet`
(docs/ARCHITECTURE.md). Everything is computed and checked in memory first; only then is each file written
atomically, so bad input leaves no output. Test episodes: `episodes.test_per_fold` per fold and
(way, shot) from the test split and the fold's test classes; validation episodes: `episodes.val_per_fold`
per fold and (way, shot) from the train split and the fold's training classes.
"""

from __future__ import annotations

import os
import sys
import time

from fscs.config.params import load_config
from fscs.core.io import write_json
from fscs.data.episodes import episode_lists, write_episodes
from fscs.data.folds import make_folds
from fscs.data.index import build_index, dataset_splits, write_index
from stages._common import run_stage, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="output image index (parquet)")
    parser.add_argument("--episodes", required=True, help="output folder for folds.json, test/val.parquet")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    config = load_config(args.params)
    dataset, folds_p, ep = config.need("dataset"), config.folds, config.episodes
    splits = dataset_splits(dataset)
    ways, shots = ep.ways, ep.shots

    index, classes = build_index(dataset)
    folds = make_folds(
        dataset.name,
        classes,
        list(dataset.exclude_classes),
        folds_p.n,
        folds_p.order,
        dataset.train_split,
        dataset.test_split,
    )
    test, dropped_test = episode_lists(
        index, folds, "test", ways, shots, ep.test_per_fold, ep.seed, ep.too_few_images
    )
    val, dropped_val = episode_lists(
        index, folds, "val", ways, shots, ep.val_per_fold, ep.seed, ep.too_few_images
    )
    folds["too_few_images"] = dropped_test + dropped_val
    for d in folds["too_few_images"]:
        print(
            f"warning: class {d['class']} ({d['name']}) has {d['images']} image(s) in split "
            f"'{d['split']}': left out of fold {d['fold']}'s {d['shot']}-shot {d['episodes']} episodes "
            "(episodes.too_few_images: drop)",
            file=sys.stderr,
        )

    write_index(index, args.index)
    write_json(os.path.join(args.episodes, "folds.json"), folds)
    write_episodes(test, os.path.join(args.episodes, "test.parquet"))
    write_episodes(val, os.path.join(args.episodes, "val.parquet"))

    per_split = " / ".join(f"{(index['split'] == s).sum()} {s}" for s in splits)
    n_folds = len(folds["folds"])
    print(
        f"prepare: {folds['dataset']}: {len(index)} images ({per_split}), {len(folds['included'])} "
        f"classes in {n_folds} folds, {len(test) // n_folds} test + {len(val) // n_folds} val episodes "
        f"per fold ({len(ways)}x{len(shots)} way/shot settings), {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    run_stage(main)
