"""`MemoryStore`: freshly encoded images served as a feature store, so the Labeler and the CST token bank
that read `fscs.features.store.FeatureStore` run on a user's images without writing a store."""

from __future__ import annotations

from typing import Any

import numpy as np


class MemoryStore:
    """Enough of `fscs.features.store.FeatureStore` for a Labeler over freshly encoded images
    (ids "0", "1", ...)."""

    def __init__(self, encs: list[dict[str, np.ndarray]], backbone: Any):
        self.encs = encs
        self.grid = tuple(backbone.grid)
        self.num_heads = backbone.num_heads
        self.attrs = backbone.store_attrs()

    def cls_query(self, image_id: str) -> np.ndarray:
        return self.encs[int(image_id)]["cls_query"]

    def patch_keys(self, image_id: str) -> np.ndarray:
        return self.encs[int(image_id)]["patch_keys"]

    def tokens(self, image_id: str) -> np.ndarray:
        return self.encs[int(image_id)]["tokens"]
