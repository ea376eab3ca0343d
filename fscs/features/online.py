"""Online features: the feature store's reads computed from the images by the backbone, with no store.

At the paper's scale on a GPU, recomputing an image's tokens (ViT-S/8 at 400 px: about 110 GFLOP, a few ms)
costs less than reading its 25 MB row, and COCO-20i's store (about 3 TB) fits no disk. `OnlineStore` offers
what later stages read from `fscs.features.store.FeatureStore` (``tokens``, ``cls_query``, ``patch_keys``,
the attributes), computed by the same `fscs.features.backbone.Backbone.extract` as extraction, on the
backbone's device, one image at a time, and kept under a byte budget. Batched extraction and one image at a
time agree up to float rounding, so online tokens equal stored ones within float16 rounding
(`tests/test_online_features.py`). `open_features` opens either, by ``features.source``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fscs.config.features import check_features
from fscs.core.errors import FscsError
from fscs.core.lru import LRUCache
from fscs.core.memory import budget_bytes
from fscs.data.images import load_rgb
from fscs.features.backbone import Backbone, backbone_from_config, preprocess
from fscs.features.store import FeatureStore, StoreMetadata, expected_attrs


class OnlineStore(StoreMetadata):
    """The store's read interface over ``image_paths`` ({image id: path}), computed on demand.

    ``cache_bytes`` bounds the encodings kept (None: keep all); a token bank reads through them
    (``keeps_rows``) instead of keeping a second copy."""

    keeps_rows = True

    def __init__(
        self,
        backbone: Backbone,
        image_paths: dict[str, str],
        layers: Any = "all",
        cache_bytes: int | None = None,
        root: str | os.PathLike = "",
    ):
        self.backbone = backbone
        self.path = Path(root)  # named in errors, as a store's file is
        self.layers_arg = layers
        self._paths = {str(k): str(v) for k, v in image_paths.items()}
        self.image_ids = list(self._paths)
        self.attrs = {**backbone.store_attrs(layers), "complete": True, "online": True}
        self._cache = LRUCache(max_bytes=cache_bytes)
        self._lock = threading.Lock()  # scoring workers and the labeler may ask at once
        self.computed = 0  # images encoded (more than asked for once the budget is full)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._paths

    def _encoding(self, image_id: str) -> dict[str, np.ndarray]:
        if image_id not in self._paths:
            raise FscsError(f"{self.path}: image id {image_id!r} is not in the dataset's index")
        with self._lock:
            return self._cache.get_or(image_id, lambda: self._encode(image_id))

    def _encode(self, image_id: str) -> dict[str, np.ndarray]:
        x = preprocess(load_rgb(self._paths[image_id]), self.backbone.input_size)[None]
        f = self.backbone.extract(x, self.layers_arg, dtype=torch.float16).cpu()
        self.computed += 1
        return {
            "tokens": f.tokens[0].numpy(),
            "cls_query": f.cls_query[0].numpy(),
            "patch_keys": f.patch_keys[0].numpy(),
        }

    def tokens(self, image_id: str) -> np.ndarray:
        """(L, 1+P, D) float16, as `FeatureStore.tokens`."""
        return self._encoding(image_id)["tokens"]

    def cls_tokens(self, image_id: str) -> np.ndarray:
        return self.tokens(image_id)[:, 0]

    def cls_query(self, image_id: str) -> np.ndarray:
        return self._encoding(image_id)["cls_query"]

    def patch_keys(self, image_id: str) -> np.ndarray:
        return self._encoding(image_id)["patch_keys"]

    def close(self) -> None:
        self._cache.clear()

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_features(
    path: str | os.PathLike, config: Any, index: pd.DataFrame | None = None, check: bool = True
) -> FeatureStore | OnlineStore:
    """The stage's features by ``config.features.source``: the store at ``path`` (checked against the
    backbone params unless ``check`` is False), or online from ``index``'s images (``path``: the dataset
    root) on the device `fscs.core.device.resolve_device` picks, keeping ``memory.tokens_mb`` of
    encodings."""
    check_features(config)  # dvc.yaml wired this path for the source
    bb = config.need("backbone")
    if config.features.source == "store":
        return FeatureStore(path, expect=expected_attrs(bb) if check else None)
    if index is None:
        raise FscsError("features.source online needs the image index (the images' paths)")
    from fscs.core.device import resolve_device

    backbone = backbone_from_config(bb, resolve_device())
    paths = {str(i): str(p) for i, p in zip(index.index, index["image_path"], strict=True)}
    cache_bytes = budget_bytes(config.memory.tokens_mb, "tokens")
    return OnlineStore(backbone, paths, bb.layers, cache_bytes, root=path)
