"""Paper settings as overrides: a small YAML file of the keys that differ from params.yaml, merged on top.

    fscs params --with configs/pascal5i.yaml --out params.yaml   # then: dvc repro
    fscs params --with configs/coco20i.yaml                      # print the merged params

params.yaml stays the one source of every default: an override file names only what a setting changes, so a
new param or a user's edit of a default reaches the paper runs too. Mappings merge key by key; a list, a
scalar or ``train.by_supervision`` (a set of overrides itself) replaces the value whole. The merged params
are validated by the config layer (`fscs.config.params.validate`) before anything is written: an override of
a key that does not exist is refused, naming it. The ``features`` keys dvc.yaml wires (store or online paths,
the extraction shards) are filled in from ``features.source`` and the dataset (`fill_features`), so an
override names only the source.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

from fscs.config.features import check_features, derived_features
from fscs.config.params import DatasetConfig, read_params, validate
from fscs.core.errors import FscsError

#: Dotted keys whose value is replaced whole even when it is a mapping.
WHOLE = {"train.by_supervision"}


def merge(base: dict[str, Any], overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``base`` with ``overrides`` applied (a new dict; neither argument changes)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        dotted = prefix + str(key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and dotted not in WHOLE:
            out[key] = merge(out[key], value, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def fill_features(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``features.path / shards / stores`` (and ``backbone.shards`` where the source decides
    them) set for its ``features.source`` and dataset (a new dict)."""
    out = copy.deepcopy(params)
    if not isinstance(out.get("dataset"), dict):
        return out
    features = out.setdefault("features", {})
    try:
        dataset = DatasetConfig.model_validate(out["dataset"])
    except ValueError:
        return out  # `validate` names what is wrong with the dataset section
    want = derived_features(dataset, features.get("source", "store"))
    features.update({k: want[k] for k in ("path", "shards", "stores")})
    backbone = out.get("backbone")
    if isinstance(backbone, dict):
        if want["backbone.shards"] is not None:
            backbone["shards"] = want["backbone.shards"]
        elif not backbone.get("shards"):
            backbone["shards"] = [0]
    return out


def merged_params(overrides: str | Path, base: str | Path = "params.yaml") -> dict[str, Any]:
    """The validated merge of an override file onto a params file, its features wiring filled in."""
    merged = fill_features(merge(read_params(base), read_params(overrides)))
    try:
        check_features(validate(merged))
    except FscsError as exc:
        raise FscsError(f"{overrides} on {base}: {exc}") from None
    return merged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--with", dest="overrides", required=True, metavar="FILE", help="override file")
    parser.add_argument(
        "--base", default="params.yaml", help="params file to start from (default: params.yaml)"
    )
    parser.add_argument("--out", help="write the merged params here (default: print them)")


def run(args: argparse.Namespace) -> None:
    from fscs.core.io import atomic_path

    merged = merged_params(args.overrides, args.base)
    text = f"# {args.base} with the overrides of {args.overrides} (fscs params)\n"
    text += yaml.safe_dump(merged, sort_keys=False)
    if not args.out:
        print(text, end="")
        return
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(f"params: {args.base} + {args.overrides} -> {args.out}")
