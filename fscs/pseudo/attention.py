"""Pseudo-labels from the frozen backbone's last-block attention (METHOD.md section 3).

Two recipes on the stored last-block CLS query (H, d) and patch keys (H, P, d):

- ``cst`` (the released CST recipe): per-head cosine between the CLS query and every patch key,
  ``fg = mean_h (cos + 1) / 2`` in [0, 1], upsampled bilinearly and thresholded (``fg >= 0.4``).
- ``dino`` (DINO's attention-mass recipe): softmax attention of the CLS query over the patch keys per head
  (scaled by 1/sqrt(d)); keep the smallest set of patches holding ``mass`` of the attention. How the heads
  are combined is ``heads``: ``mean`` (default: the mass rule on the head-averaged attention), ``vote``
  (a patch is kept by at least half the heads) or ``union`` (kept by any head); all measured in
  reports/pseudo.json.

A *self* map uses an image's own CLS query against its own keys (support pseudo-masks); a *pair* map uses the
SUPPORT's CLS query against the QUERY's keys (query pseudo-masks, class-conditioned through the support); it
is all background when the query's image-level labels say the class is absent.

``Labeler`` is what training, baselines and evaluation use: foreground maps at grid resolution, optionally
passed through the pseudo-label enhancer (``fscs.pseudo.enhancer``) for the mixed setting; ``to_mask``
upsamples and thresholds.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import h5py
import numpy as np

from fscs.config.params import PseudoConfig
from fscs.core.device import resolve_device
from fscs.core.errors import FscsError
from fscs.core.io import json_attr
from fscs.core.lru import LRUCache
from fscs.core.provenance import check_derived
from fscs.core.resample import bilinear, size_hw
from fscs.pseudo.enhancer import enhance, load_enhancer

RECIPES = ("cst", "dino")
DINO_HEADS = ("mean", "vote", "union")
#: store rows (an image's CLS query or patch keys) a Labeler keeps: pair maps read two per training episode.
#: A patch-key row is H x P x d float16: 192 KiB for ViT-S/14 at 224 (6 x 256 x 64), 1.9 MB for ViT-S/8 at
#: 400 (6 x 2,500 x 64), so at most about 200 MB / 2 GB; a CLS query row is 768 bytes
ROW_CACHE = 1024


# ----------------------------------------------------------------------------------------------- recipes
def head_cosine(cls_query: np.ndarray, patch_keys: np.ndarray, center: bool = False) -> np.ndarray:
    """Per-head cosine between the CLS query (H, d) and the patch keys (H, P, d) -> (H, P) float32.

    ``center``: subtract the mean patch key (per head, over the P patches) first. Softmax attention is
    unchanged by a key component shared by all patches, but the cosine is dominated by it when it is large:
    DINOv2's last-block keys have |mean key| ~ 0.93 |key|, so the raw cosines of an image all lie in about
    [0.1, 0.7] and (cos + 1) / 2 >= 0.4 everywhere (reports/pseudo.json measures both).
    """
    q = np.asarray(cls_query, dtype=np.float32)
    k = np.asarray(patch_keys, dtype=np.float32)
    if q.ndim != 2 or k.ndim != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[1]:
        raise FscsError(f"head_cosine: shapes {q.shape} and {k.shape} are not (H, d) and (H, P, d)")
    if center:
        k = k - k.mean(axis=1, keepdims=True)
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-6)
    k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
    return np.einsum("hd,hpd->hp", q, k).astype(np.float32)


def cst_foreground(cos_maps: np.ndarray) -> np.ndarray:
    """Head-mean of (cos + 1) / 2: per-head cosine maps (H, ...) -> foreground in [0, 1] (...)."""
    return ((np.asarray(cos_maps, dtype=np.float32) + 1.0) / 2.0).mean(axis=0)


def dino_attention(cls_query: np.ndarray, patch_keys: np.ndarray) -> np.ndarray:
    """Softmax attention of the CLS query over the patch keys per head, scale 1/sqrt(d) -> (H, P) float32."""
    q = np.asarray(cls_query, dtype=np.float32)
    k = np.asarray(patch_keys, dtype=np.float32)
    logits = np.einsum("hd,hpd->hp", q, k) / np.sqrt(q.shape[-1])
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def mass_mask(attn: np.ndarray, mass: float) -> np.ndarray:
    """Smallest set of positions holding ``mass`` of each row's attention: (..., P) -> (..., P) bool."""
    a = np.asarray(attn, dtype=np.float64)
    a = a / a.sum(axis=-1, keepdims=True)
    order = np.argsort(-a, axis=-1, kind="stable")
    sorted_a = np.take_along_axis(a, order, axis=-1)
    before = np.cumsum(sorted_a, axis=-1) - sorted_a  # mass strictly before each position
    keep_sorted = before < mass
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def dino_foreground(
    cls_query: np.ndarray, patch_keys: np.ndarray, mass: float = 0.6, heads: str = "mean"
) -> np.ndarray:
    """DINO recipe: binary (P,) float32 mask (0/1) keeping ``mass`` of the CLS attention (see module doc)."""
    attn = dino_attention(cls_query, patch_keys)
    if heads == "mean":
        keep = mass_mask(attn.mean(axis=0), mass)
    elif heads == "vote":
        keep = mass_mask(attn, mass).mean(axis=0) >= 0.5
    elif heads == "union":
        keep = mass_mask(attn, mass).any(axis=0)
    else:
        raise FscsError(f"dino_foreground: heads must be one of {DINO_HEADS}, got {heads!r}")
    return keep.astype(np.float32)


# ------------------------------------------------------------------------------------------ masks
def to_mask(fg: np.ndarray, threshold: float, size: int | tuple[int, int]) -> np.ndarray:
    """Upsample a foreground map to ``size`` (int or (h, w)) and threshold: ``fg >= threshold`` -> bool."""
    return bilinear(fg, size) >= threshold


# ------------------------------------------------------------------------------------ pseudo-label file
def write_self_maps(path: str | os.PathLike, image_ids: list[str], maps: np.ndarray, attrs: dict) -> None:
    """Write a pseudo-label file: ``image_ids`` (N,) and ``self_maps`` (N, H, gh, gw) float16 + attrs.

    ``path`` should be a temporary path (the stage renames it into place)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("image_ids", data=np.array(image_ids, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("self_maps", data=np.asarray(maps, dtype=np.float16), chunks=True)
        for key, value in attrs.items():
            f.attrs[key] = json_attr(value)


def read_self_maps(path: str | os.PathLike) -> tuple[list[str], np.ndarray, dict]:
    """Read a pseudo-label file -> (image_ids, self_maps (N, H, gh, gw) float16, attrs)."""
    if not os.path.isfile(path):
        raise FscsError(f"{path}: pseudo-label file not found")
    try:
        with h5py.File(path, "r") as f:
            if "self_maps" not in f or "image_ids" not in f:
                raise FscsError(f"{path}: not a pseudo-label file (needs 'image_ids' and 'self_maps')")
            ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["image_ids"][()]]
            return ids, f["self_maps"][()], dict(f.attrs)
    except OSError as exc:
        raise FscsError(f"{path}: not a readable HDF5 file ({exc})") from exc


# --------------------------------------------------------------------------------------------- Labeler
class Labeler:
    """Foreground probability maps at grid resolution for supports (self maps) and (support, query) pairs.

    store: a ``fscs.features.store.FeatureStore`` (anything with ``cls_query``, ``patch_keys``, ``grid``,
      ``attrs``).
    pseudo_path: optional ``data/pseudo/<ds>.h5``; its per-head self maps are used instead of recomputing
      them from the store (checked against the store's provenance).
    enhancer: optional ``fscs.pseudo.enhancer.Enhancer`` module, or a checkpoint path (then ``fold`` picks the
      fold's enhancer when the checkpoint holds one per fold). Enhanced maps are probabilities; their mask
      threshold is the enhancer's (0.5), see ``mask_threshold``.
    recipe: ``cst`` or ``dino``; threshold: the raw-map threshold (``pseudo.cst_threshold``; a dino map is
      binary, any threshold in (0, 1] works, 0.5 is used).
    center_keys: subtract the mean patch key before the cosine (``pseudo.center_keys``, see ``head_cosine``).
    ``Labeler.from_config(store, config.pseudo, ...)`` builds one from params.yaml's ``pseudo`` section.

    ``support_fg(id)`` and ``pair_fg(support_id, query_id, present=True)`` return (gh, gw) float32 in [0, 1];
    ``support_mask`` / ``pair_mask`` also upsample and threshold with ``to_mask``. Self maps are cached.
    """

    def __init__(
        self,
        store: Any,
        pseudo_path: str | os.PathLike | None = None,
        enhancer: Any = None,
        recipe: str = "cst",
        threshold: float = 0.5,
        dino_mass: float = 0.6,
        dino_heads: str = "mean",
        fold: int | None = None,
        center_keys: bool = True,
        cache_size: int = 8192,
    ) -> None:
        if recipe not in RECIPES:
            raise FscsError(f"pseudo recipe must be one of {RECIPES}, got {recipe!r}")
        if dino_heads not in DINO_HEADS:
            raise FscsError(f"pseudo dino_heads must be one of {DINO_HEADS}, got {dino_heads!r}")
        self.store = store
        self.recipe = recipe
        self.threshold = float(threshold) if recipe == "cst" else 0.5
        self.dino_mass = float(dino_mass)
        self.dino_heads = dino_heads
        self.center_keys = bool(center_keys)
        self.grid = tuple(int(g) for g in store.grid)
        if isinstance(enhancer, str | os.PathLike):
            enhancer = load_enhancer(enhancer, fold=fold)
            device = resolve_device()
            if device.type == "cuda":  # the caller trains there: one small forward per episode, off the CPU
                enhancer.to(device)
        if enhancer is not None and recipe != "cst":
            raise FscsError("the enhancer works on the per-head cosine maps of the 'cst' recipe, not 'dino'")
        self.enhancer = enhancer
        if enhancer is not None:
            enhancer.eval()
        self._precomputed: dict[str, np.ndarray] | None = None
        if pseudo_path is not None:
            ids, maps, attrs = read_self_maps(pseudo_path)
            check_derived(pseudo_path, attrs, dict(store.attrs))
            made = bool(attrs.get("center_keys", False))
            if made != self.center_keys:
                raise FscsError(
                    f"{pseudo_path}: self maps were made with center_keys={made}, the labeler asks for "
                    f"{self.center_keys}; re-run `dvc repro pseudo`"
                )
            if tuple(maps.shape[2:]) != self.grid:
                raise FscsError(
                    f"{pseudo_path}: self maps are {maps.shape[2:]}, the store's grid is {self.grid}"
                )
            self._precomputed = {i: maps[r] for r, i in enumerate(ids)}
        self._cache = LRUCache(cache_size)
        self._rows = LRUCache(ROW_CACHE)

    @classmethod
    def from_config(
        cls,
        store: Any,
        p: PseudoConfig,
        pseudo_path: str | os.PathLike | None = None,
        enhancer: Any = None,
        fold: int | None = None,
    ) -> Labeler:
        """A labeler with params.yaml's validated ``pseudo`` settings (recipe, threshold, dino mass/heads,
        centring)."""
        return cls(
            store,
            pseudo_path=pseudo_path,
            enhancer=enhancer,
            recipe=p.recipe,
            threshold=p.cst_threshold,
            dino_mass=p.dino_mass,
            dino_heads=p.dino_heads,
            fold=fold,
            center_keys=p.center_keys,
        )

    @property
    def mask_threshold(self) -> float:
        """Threshold to apply to this labeler's maps (the enhancer's when enhanced)."""
        if self.enhancer is not None:
            return float(getattr(self.enhancer, "threshold", 0.5))
        return self.threshold

    # per-head cosine maps ------------------------------------------------------------------------
    def _cls_query(self, image_id: str) -> np.ndarray:
        """The store's CLS query row of ``image_id``, read once while it stays among `ROW_CACHE` rows."""
        return self._rows.get_or(("cls_query", image_id), partial(self.store.cls_query, image_id))

    def _patch_keys(self, image_id: str) -> np.ndarray:
        """The store's patch-key row of ``image_id``, read once while it stays among `ROW_CACHE` rows."""
        return self._rows.get_or(("patch_keys", image_id), partial(self.store.patch_keys, image_id))

    def self_cosine(self, image_id: str) -> np.ndarray:
        """Per-head self cosine maps (H, gh, gw) float32."""
        if self._precomputed is not None and image_id in self._precomputed:
            return self._precomputed[image_id].astype(np.float32)
        cos = head_cosine(self._cls_query(image_id), self._patch_keys(image_id), self.center_keys)
        return cos.reshape(cos.shape[0], *self.grid)

    def pair_cosine(self, support_id: str, query_id: str) -> np.ndarray:
        """Per-head cosine of the support's CLS query with the query's keys (H, gh, gw) float32."""
        cos = head_cosine(self._cls_query(support_id), self._patch_keys(query_id), self.center_keys)
        return cos.reshape(cos.shape[0], *self.grid)

    def _fg(self, cls_id: str, keys_id: str, cos: np.ndarray | None) -> np.ndarray:
        if self.recipe == "dino":
            fg = dino_foreground(
                self._cls_query(cls_id), self._patch_keys(keys_id), self.dino_mass, self.dino_heads
            )
            return fg.reshape(self.grid)
        if self.enhancer is not None:
            return enhance(self.enhancer, cos[None])[0]
        return cst_foreground(cos)

    # public maps ---------------------------------------------------------------------------------
    def support_fg(self, image_id: str) -> np.ndarray:
        """Self-map foreground (gh, gw) float32 in [0, 1] (enhanced if an enhancer is set); cached."""
        return self._cache.get_or(image_id, partial(self._support_fg, image_id))

    def _support_fg(self, image_id: str) -> np.ndarray:
        cos = None if self.recipe == "dino" else self.self_cosine(image_id)
        fg = np.ascontiguousarray(self._fg(image_id, image_id, cos), dtype=np.float32)
        fg.setflags(write=False)
        return fg

    def pair_fg(self, support_id: str, query_id: str, present: bool = True) -> np.ndarray:
        """Pair-map foreground (gh, gw) of the query for the support's class; zeros if not ``present``."""
        if not present:
            return np.zeros(self.grid, dtype=np.float32)
        cos = None if self.recipe == "dino" else self.pair_cosine(support_id, query_id)
        return np.asarray(self._fg(support_id, query_id, cos), dtype=np.float32)

    def support_mask(self, image_id: str, size: int | tuple[int, int]) -> np.ndarray:
        """Support pseudo-mask: bool (size) = upsampled self map >= mask_threshold."""
        return to_mask(self.support_fg(image_id), self.mask_threshold, size)

    def pair_mask(
        self, support_id: str, query_id: str, size: int | tuple[int, int], present: bool = True
    ) -> np.ndarray:
        """Query pseudo-mask for the support's class: bool (size); all False when the class is absent."""
        if not present:
            return np.zeros(size_hw(size), dtype=bool)
        return to_mask(self.pair_fg(support_id, query_id), self.mask_threshold, size)
