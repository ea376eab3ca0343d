"""Stage `extract`: join the extraction shards into the feature store every later stage opens.

    python -m stages.extract --index data/index/msrc.parquet --shards data/features/msrc.shards \
        --shard-reports reports/extract_shards --out data/features/msrc.h5 --report reports/extract.json \
        [--params params.yaml]

Each `extract_shard@I` stage (`stages.extract_shard --shard I`) writes `<shards>/shard-I.h5` and
`<shard-reports>/shard-I.json`; this stage checks every shard of `backbone.shards` against the index and the
params and writes a small HDF5 file of virtual datasets over them (`fscs.features.shards`). With one shard
(the default) later stages read the same datasets, attributes and values as from a single-file store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fscs.config.params import load_config
from fscs.core.errors import FscsError
from fscs.core.io import write_json
from fscs.data.image_list import read_image_list
from fscs.features.shards import join_shards, shard_file
from fscs.features.store import expected_attrs
from stages._common import run_stage, stage_parser


def read_shard_report(path: Path) -> dict:
    """One shard's extraction report (written by `stages.extract_shard`)."""
    if not path.is_file():
        raise FscsError(f"{path}: shard report not found; re-run `dvc repro extract`")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="image index parquet (image_id, image_path)")
    parser.add_argument("--shards", required=True, help="folder of the shard stores (shard-I.h5)")
    parser.add_argument("--shard-reports", required=True, help="folder of the shard reports (shard-I.json)")
    parser.add_argument("--out", required=True, help="joined feature store to write (.h5)")
    parser.add_argument("--report", required=True, help="extraction report JSON")
    args = parser.parse_args(argv)

    config = load_config(args.params)
    shards = config.need("backbone").shards
    ids, _ = read_image_list(args.index)
    reports = [read_shard_report(Path(args.shard_reports) / f"shard-{i}.json") for i in shards]
    t0 = time.perf_counter()
    files = [shard_file(args.shards, i) for i in shards]
    stats = join_shards(files, args.out, ids, expected_attrs(config.need("backbone")))
    computed = sum(r["computed"] for r in reports)
    seconds = sum(r["seconds"] for r in reports)
    report = {
        **stats,
        "join_seconds": round(time.perf_counter() - t0, 3),
        "computed": computed,
        "seconds": round(seconds, 3),
        "images_per_s": round(computed / seconds, 3) if seconds > 0 and computed else None,
        "shard_reports": reports,
    }
    write_json(args.report, report)
    print(
        f"extract: {len(shards)} shard(s), {stats['images']} images -> {args.out} "
        f"({stats['store_bytes'] / 1e6:.1f} MB in all, {stats['bytes_per_image'] / 1e6:.2f} MB/image)"
    )


if __name__ == "__main__":
    run_stage(main)
