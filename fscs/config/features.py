"""The dvc.yaml wiring of a features source (``features.path / shards / stores``, ``backbone.shards``): what
`fscs params` writes and what a stage that opens the features checks, so a hand edit cannot send a stage to
the wrong file. Kept out of `fscs.config.params`, which every stage imports: only the stages that open the
features read these sections."""

from __future__ import annotations

from typing import Any

from fscs.config.params import Config, DatasetConfig
from fscs.core.errors import FscsError


def derived_features(dataset: DatasetConfig, source: str) -> dict[str, Any]:
    """The dvc.yaml wiring of a features source: ``features.path / shards / stores`` and the extraction
    shards it implies (``backbone.shards``: None keeps the configured ones)."""
    if source == "online":
        return {"path": dataset.root, "shards": dataset.root, "stores": [], "backbone.shards": []}
    base = f"data/features/{dataset.name}"
    return {
        "path": f"{base}.h5",
        "shards": f"{base}.shards",
        "stores": [dataset.name],
        "backbone.shards": None,
    }


def check_features(config: Config) -> None:
    """FscsError when ``features`` and ``backbone.shards`` disagree with what the source needs."""
    if config.dataset is None:
        return
    f = config.features
    want = derived_features(config.dataset, f.source)
    wrong = [
        f"features.{key}: {getattr(f, key)!r} (needs {want[key]!r})"
        for key in ("path", "shards", "stores")
        if getattr(f, key) is not None and getattr(f, key) != want[key]
    ]
    shards = config.backbone.shards if config.backbone is not None else None
    if shards is not None and want["backbone.shards"] is not None and shards != want["backbone.shards"]:
        wrong.append(f"backbone.shards: {shards!r} (needs [] : online features extract nothing)")
    if shards == [] and f.source == "store":
        wrong.append("backbone.shards: [] (needs at least [0]: the store is extracted in shards)")
    if wrong:
        raise FscsError(
            f"params: features.source {f.source!r} with dataset {config.dataset.name!r} disagrees: "
            + "; ".join(wrong)
            + "; `fscs params --with FILE --out params.yaml` writes the matching values"
        )
