"""Stage `extract_shard@I`: the indexed images of shard I through the frozen backbone into an HDF5 store.

    python -m stages.extract_shard --shard 0 --index data/index/msrc.parquet \
        --out data/features/msrc.shards/shard-0.h5 --report reports/extract_shards/shard-0.json
    python -m stages.extract_shard --index data/index/msrc.parquet --out features.h5 --report x.json  # all

Params (section `backbone`): `name`, `input_size`, `layers`, `batch_size`, `precision`, optional `arch` (for
`path:` names) and `threads` (torch CPU threads; default all available cores). The device comes from
``FSCS_DEVICE`` (`fscs.core.device`), not from params. Images are checked to decode before
the model runs. The store is written to `<out>.partial` and renamed when complete; a killed run resumes.
With `--shard I` only shard I's rows of the index are extracted (`backbone.shards` lists the shards; rows
from `fscs.features.shards.shard_rows`), without it every row: `dvc.yaml` runs one `extract_shard@I` per
shard, then stage `extract` (`stages.extract`) joins them into the store later stages read.
"""

from __future__ import annotations

import time

from fscs.config.params import load_config
from fscs.core.io import write_json
from fscs.core.threads import default_threads
from fscs.data.image_list import read_image_list
from fscs.features.shards import shard_rows
from stages._common import run_stage, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="image index parquet (image_id, image_path)")
    parser.add_argument("--out", required=True, help="feature store to write (.h5)")
    parser.add_argument("--report", required=True, help="extraction report JSON")
    parser.add_argument("--shard", type=int, help="extract only this shard's rows (default: every row)")
    args = parser.parse_args(argv)

    config = load_config(args.params)
    bb = config.need("backbone")
    ids, paths = read_image_list(args.index)
    if args.shard is not None:
        rows = shard_rows(len(ids), len(bb.shards), args.shard)
        ids, paths = ids[rows.start : rows.stop], paths[rows.start : rows.stop]
    layers, batch_size = bb.layers, bb.batch_size
    threads = bb.threads or default_threads()

    import torch

    from fscs.core.device import describe, resolve_device
    from fscs.features.backbone import backbone_from_config
    from fscs.features.extraction import check_images, extract_to_store

    device = resolve_device()  # a bad FSCS_DEVICE stops here, before any work
    check_images(paths)  # before the (slow) backbone load and before any output
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    backbone = backbone_from_config(config.need("backbone"), device)
    load_s = time.perf_counter() - t0
    storage = config.need("backbone").storage
    stats = extract_to_store(
        backbone, ids, paths, args.out, layers=layers, batch_size=batch_size, check=False, storage=storage
    )
    report = {
        **stats,
        "load_seconds": round(load_s, 3),
        "batch_size": batch_size,
        "threads": threads,
        "input_size": backbone.input_size,
        "grid": list(backbone.grid),
        "layers": backbone.resolve_layers(layers),
        "backbone": backbone.provenance.as_dict(),
        "torch": torch.__version__,
        "device": describe(device),
        "precision": backbone.precision,
        "storage": storage,
    }
    write_json(args.report, report)
    rate = f"{stats['images_per_s']:.2f} img/s" if stats["images_per_s"] else "nothing to compute"
    print(
        f"extract: {stats['images']} images -> {args.out} ({stats['store_bytes'] / 1e6:.1f} MB, "
        f"{stats['bytes_per_image'] / 1e6:.2f} MB/image, {rate}, {backbone.name} @ {backbone.input_size}, "
        f"{stats['resumed_rows']} rows resumed)"
    )


if __name__ == "__main__":
    run_stage(main)
