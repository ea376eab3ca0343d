"""A photometric or resolution shift of a split's images, with an index that points at the copies: a domain
shift to test a rule on, with the same image ids, masks and episodes as the original.

    python -m experiments.shifted_images --kind grayblur --out /tmp/shift/grayblur
    python -m stages.extract_shard --index /tmp/shift/grayblur/index.parquet \
        --out /tmp/shift/grayblur/features.h5 --report /tmp/shift/grayblur/extract.json

``grayblur``: grey, Gaussian blur (sigma 2 px); ``lowres``: 5x down and back up; ``dark``: gamma 1.5, a third
of the brightness and a blue cast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from skimage import color, filters, io, transform, util

from fscs.data.index import read_index

KINDS = ("grayblur", "lowres", "dark")


def shifted(image: np.ndarray, kind: str) -> np.ndarray:
    """The image (float RGB in [0, 1]) under the shift ``kind``."""
    if kind == "grayblur":
        return np.stack([filters.gaussian(color.rgb2gray(image), sigma=2)] * 3, -1)
    if kind == "lowres":
        h, w = image.shape[:2]
        small = transform.resize(image, (max(1, h // 5), max(1, w // 5)), anti_aliasing=True)
        return transform.resize(small, (h, w), order=1)
    if kind == "dark":
        return 0.35 * image**1.5 + 0.1 * np.array([0.2, 0.1, 0.4])
    raise ValueError(f"unknown shift {kind!r}; one of {KINDS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default="data/index/msrc.parquet")
    ap.add_argument("--split", default="val", help="the index split to copy (MSRC's test split: val)")
    ap.add_argument("--kind", required=True, choices=KINDS)
    ap.add_argument("--out", required=True, help="folder for the images and index.parquet")
    args = ap.parse_args()
    index = read_index(args.index)
    index = index[index["split"] == args.split].copy()
    folder = Path(args.out) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in index.itertuples():
        image = util.img_as_float(io.imread(row.image_path))[..., :3]
        path = folder / f"{row.image_id}.png"
        io.imsave(path, util.img_as_ubyte(np.clip(shifted(image, args.kind), 0, 1)), check_contrast=False)
        paths.append(str(path))
    index["image_path"] = paths
    index.to_parquet(Path(args.out) / "index.parquet")
    print(f"{len(index)} '{args.split}' images under a {args.kind} shift -> {args.out}")


if __name__ == "__main__":
    main()
