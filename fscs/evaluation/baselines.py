"""Training-free baselines on the fixed test episodes, as predictors for
`fscs.evaluation.episodes.run_episodes`.

Every baseline turns (query, support class, its K support images) into a raw foreground map on the token grid
with values in [0, 1], and nothing is learned; only decision thresholds are set, on the fold's VALIDATION
episodes (training split, training classes), never on test:

- ``attention``: the raw attention pseudo-mask of the query under the support's CLS:
  ``cst_foreground(head_cosine(support CLS query, query patch keys))`` (METHOD.md section 3; keys centred
  when the labeler's ``center_keys`` is set, as ``pseudo.center_keys``), averaged over the K shots. No
  support mask is used (image-level supervision).
- ``prototype``: masked-average prototype of the support patch tokens (one stored block, ``layer``) pooled
  over the K shots, weighted by the support's *self pseudo-mask* (image-level supervision: the Labeler's
  self map thresholded at the pseudo-label threshold); fg = (cos(prototype, query patch token) + 1) / 2.
- ``prototype_gt``: the same with the support's ground-truth mask (its area fraction per token cell) as the
  weights: a training-free pixel-level reference.
A support whose mask is empty falls back to all its patches with equal weights. With
``pseudo.stuff_masks: complement`` the image-level baselines follow the learner's rule for stuff classes
(`fscs.learn.targets`): the attention map and the support pseudo-mask are complemented, so both sides of the
learner-vs-baseline comparison know the same thing (which class names are stuff).

Decisions, calibrated per (way, shot) setting on validation episodes of the same setting (pooled over all
validation episodes for a setting that validation lacks):
- presence score = a statistic of the raw map (``max``, ``mean``, or ``top10``: the mean of its top 10 %
  cells); statistic and threshold chosen to maximise per-class presence accuracy on validation;
- segmentation threshold chosen to maximise validation mIoU (over the fold's training classes), after
  gating (with ``gate``, a class predicted absent gets an all-background map).
Outputs are affine in the raw map so the shared decision rules (presence > 0.5, fg >= 0.5 after bilinear
upsampling) reproduce the calibrated thresholds exactly: presence = 0.5 + (score - t_p) / 2,
fg = 0.5 + (raw - t_s) / 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from fscs.core.errors import FscsError
from fscs.core.lru import LRUCache
from fscs.core.resample import bilinear_gather
from fscs.data.folds import fold_classes
from fscs.data.images import gt_mask
from fscs.evaluation.episodes import setting_key
from fscs.evaluation.metrics import ThresholdSweep, check_void
from fscs.learn.calibration import best_threshold
from fscs.pseudo.attention import cst_foreground, head_cosine

BASELINES = ("attention", "prototype", "prototype_gt")
STATS = ("max", "mean", "top10")
CACHED_SMALL = 2048  # entries of the per-image caches of small arrays (CLS queries, support weights)
#: supervision each baseline corresponds to (what it may use of the support)
SUPERVISION = {"attention": "image", "prototype": "image", "prototype_gt": "pixel"}
POOLED = "all"


def presence_score(raw: np.ndarray, stat: str) -> float:
    """A scalar presence score from a raw foreground map."""
    flat = np.asarray(raw, dtype=np.float32).ravel()
    if stat == "max":
        return float(flat.max())
    if stat == "mean":
        return float(flat.mean())
    if stat == "top10":
        k = max(1, int(round(0.1 * flat.size)))
        return float(np.sort(flat)[-k:].mean())
    raise FscsError(f"baselines: presence statistic must be one of {STATS}, got {stat!r}")


class MapBaseline:
    """Base class: subclasses implement ``raw_map(query_id, class_id, support_ids) -> (gh, gw)`` in [0, 1]."""

    name = "base"

    def __init__(self, gate: bool = True, stats: Sequence[str] = STATS):
        for s in stats:
            if s not in STATS:
                raise FscsError(f"baselines: presence statistic must be one of {STATS}, got {s!r}")
        self.gate = bool(gate)
        self.stats = list(stats)
        self.calibration: dict[str, dict[str, Any]] = {}

    def raw_map(self, query_id: str, class_id: int, support_ids: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def _rule(self, way: int, shot: int) -> dict[str, Any]:
        rule = self.calibration.get(setting_key(way, shot)) or self.calibration.get(POOLED)
        if rule is None:
            raise FscsError(f"baseline {self.name}: not calibrated (call calibrate() on validation episodes)")
        return rule

    def predict(
        self, query_id: str, support_classes: Sequence[int], support_ids: Sequence[Sequence[str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        rule = self._rule(len(support_classes), len(support_ids[0]))
        raws = [self.raw_map(query_id, c, ids) for c, ids in zip(support_classes, support_ids, strict=True)]
        scores = np.array([presence_score(r, rule["stat"]) for r in raws])
        presence = 0.5 + (scores - rule["presence_threshold"]) / 2
        fg = np.stack([0.5 + (r - rule["seg_threshold"]) / 2 for r in raws]).astype(np.float32)
        if self.gate:
            fg[presence <= 0.5] = 0.0
        return presence, fg

    # ------------------------------------------------------------------------------------- calibration
    def calibrate(
        self,
        episodes: pd.DataFrame,
        index: pd.DataFrame,
        classes: Sequence[int],
        void: str = "ignore",
        progress: bool = True,
        pooled: bool = True,
    ) -> dict[str, dict[str, Any]]:
        """Choose presence statistic/threshold and segmentation threshold on validation ``episodes``.

        ``classes``: the classes validation mIoU averages over (the fold's training classes).
        Sets and returns ``self.calibration``: {"1way1shot": rule, ..., "all": pooled rule}; ``pooled``
        False skips the pooled rule (the fallback for settings validation lacks).
        """
        check_void(void)
        if episodes.empty:
            raise FscsError(f"baseline {self.name}: no validation episodes to calibrate on")
        items = []  # (setting, raws (N, gh, gw), labels (N,), classes, query)
        eps = episodes.itertuples(index=False)
        for ep in tqdm(
            eps, total=len(episodes), desc=f"calibrate {self.name}", disable=None if progress else True
        ):
            sup_classes = [int(c) for c in ep.support_classes]
            raws = np.stack(
                [
                    self.raw_map(str(ep.query_id), c, [str(s) for s in ids])
                    for c, ids in zip(sup_classes, ep.support_ids, strict=True)
                ]
            )
            items.append(
                (
                    setting_key(ep.way, ep.shot),
                    raws,
                    np.asarray(ep.labels, int),
                    sup_classes,
                    str(ep.query_id),
                )
            )
        groups: dict[str, list] = {POOLED: items} if pooled else {}
        for it in items:
            groups.setdefault(it[0], []).append(it)
        masks: dict[str, np.ndarray] = {}
        self.calibration = {
            key: self._calibrate_group(group, index, classes, void, masks) for key, group in groups.items()
        }
        return self.calibration

    def _calibrate_group(self, items, index, classes, void, masks) -> dict[str, Any]:
        labels = np.concatenate([it[2] for it in items])
        best = None
        for stat in self.stats:
            scores = np.concatenate([[presence_score(r, stat) for r in it[1]] for it in items])
            t, acc = best_threshold(scores, labels)
            if best is None or acc > best[2]:
                best = (stat, t, acc)
        stat, t_p, acc = best
        # segmentation threshold: candidates = quantiles of the raw values and a fixed 0.025 grid on [0, 1]
        values = np.concatenate([it[1].ravel() for it in items])
        cands = np.unique(
            np.round(
                np.concatenate([np.quantile(values, np.linspace(0.02, 0.98, 49)), np.linspace(0, 1, 41)]), 4
            )
        )
        sweep = ThresholdSweep(classes, cands, void)
        for _, raws, _, sup_classes, query in items:
            if query not in masks:
                masks[query] = gt_mask(index, query)
            gt = masks[query]
            r = raws.astype(np.float32).copy()
            if self.gate:
                keep = np.array([presence_score(m, stat) > t_p for m in raws])
                r[~keep] = -1.0  # never foreground
            up = bilinear_gather(r, gt.shape)
            sweep.update(up.max(axis=0), up.argmax(axis=0) + 1, gt, sup_classes)
        mious = sweep.miou()
        mious = np.where(np.isnan(mious), -1.0, mious)
        j = int(np.argmax(mious))
        return {
            "stat": stat,
            "presence_threshold": float(t_p),
            "seg_threshold": float(cands[j]),
            "val_presence_acc": round(100 * acc, 4),
            "val_miou": round(float(mious[j]), 4),
            "val_episodes": len(items),
        }


class AttentionBaseline(MapBaseline):
    """The raw pair attention map (support CLS query vs. query keys, ``cst`` recipe), averaged over shots."""

    name = "attention"

    def __init__(
        self,
        store: Any,
        center_keys: bool = False,
        complement: set[int] | None = None,
        **kw: Any,
    ):
        super().__init__(**kw)
        self.store = store
        self.center_keys = bool(center_keys)
        self.complement = set(complement or ())
        self.grid = tuple(int(g) for g in store.grid)
        self._q = LRUCache(CACHED_SMALL)  # (H, d) CLS queries
        self._k = LRUCache(64)  # (H, P, d) keys are large (3.8 MB at 50x50 tokens); queries rarely repeat

    def raw_map(self, query_id: str, class_id: int, support_ids: Sequence[str]) -> np.ndarray:
        keys = self._k.get_or(query_id, lambda: np.asarray(self.store.patch_keys(query_id), dtype=np.float32))
        maps = []
        for s in support_ids:
            q = self._q.get_or(s, lambda s=s: np.asarray(self.store.cls_query(s), dtype=np.float32))
            maps.append(cst_foreground(head_cosine(q, keys, self.center_keys)))
        fg = np.mean(np.stack(maps), axis=0)
        if int(class_id) in self.complement:  # a stuff class: where the attention is not
            fg = 1.0 - fg
        return fg.reshape(self.grid).astype(np.float32)


class PrototypeBaseline(MapBaseline):
    """Masked-average prototype of one stored block's support patch tokens, cosine with the query's.

    ``support_mask``: ``"pseudo"`` (the Labeler's self pseudo-mask, image-level) or ``"gt"`` (the support's
    ground-truth mask of the episode class; needs ``index``).
    """

    def __init__(
        self,
        store: Any,
        labeler: Any = None,
        index: pd.DataFrame | None = None,
        support_mask: str = "pseudo",
        layer: int = -1,
        token_cache: LRUCache | None = None,
        complement: set[int] | None = None,
        **kw: Any,
    ):
        super().__init__(**kw)
        self.complement = set(complement or ()) if support_mask == "pseudo" else set()
        if support_mask not in ("pseudo", "gt"):
            raise FscsError(
                f"prototype baseline: support_mask must be 'pseudo' or 'gt', got {support_mask!r}"
            )
        if support_mask == "pseudo" and labeler is None:
            raise FscsError("prototype baseline: the pseudo support mask needs a Labeler")
        if support_mask == "gt" and index is None:
            raise FscsError("prototype baseline: the GT support mask needs the image index")
        self.name = "prototype" if support_mask == "pseudo" else "prototype_gt"
        self.store = store
        self.labeler = labeler
        self.index = index
        self.support_mask = support_mask
        self.grid = tuple(int(g) for g in store.grid)
        self.layer_pos = layer_position(store, layer)
        self._tok = token_cache if token_cache is not None else LRUCache(max_bytes=None)
        self._w = LRUCache(CACHED_SMALL)  # (P,) support weights

    def patch_tokens(self, image_id: str) -> np.ndarray:
        """(P, D) float32 unit-norm patch tokens of the chosen block (cached)."""

        def make():
            t = np.asarray(self.store.tokens(image_id)[self.layer_pos, 1:], dtype=np.float32)
            return t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-6)

        return self._tok.get_or(image_id, make)

    def weights(self, image_id: str, class_id: int) -> np.ndarray:
        """(P,) support weights in [0, 1]: pseudo-mask (binary) or GT area fraction per token cell."""

        def make():
            if self.support_mask == "pseudo":
                fg = self.labeler.support_fg(image_id)
                on = np.asarray(fg) >= self.labeler.mask_threshold
                w = (~on if int(class_id) in self.complement else on).astype(np.float32)
            else:
                w = gt_cell_fraction(gt_mask(self.index, image_id), class_id, self.grid)
            return w.reshape(-1)

        return self._w.get_or((image_id, int(class_id)), make)

    def prototype(self, class_id: int, support_ids: Sequence[str]) -> np.ndarray:
        num, den = 0.0, 0.0
        for s in support_ids:
            t = self.patch_tokens(s)
            w = self.weights(s, class_id)
            if w.sum() <= 0:
                w = np.ones_like(w)
            num = num + (t * w[:, None]).sum(axis=0)  # no BLAS: its threads crawl on a busy small CPU
            den = den + w.sum()
        p = num / den
        return p / max(float(np.linalg.norm(p)), 1e-6)

    def raw_map(self, query_id: str, class_id: int, support_ids: Sequence[str]) -> np.ndarray:
        cos = (self.patch_tokens(query_id) * self.prototype(class_id, support_ids)).sum(axis=1)
        return ((np.clip(cos, -1.0, 1.0) + 1.0) / 2.0).reshape(self.grid).astype(np.float32)


def layer_position(store: Any, layer: int) -> int:
    """Position in the store's token layers of block ``layer`` (negative: from the backbone's last block)."""
    layers = [int(v) for v in store.attrs["layers"]]
    depth = int(store.attrs.get("depth", max(layers) + 1))
    block = int(layer) % depth if -depth <= int(layer) < depth else None
    if block is None or block not in layers:
        raise FscsError(
            f"baselines: block {layer} is not in the feature store (stored blocks {layers}); "
            "set evaluate.baselines.layer to one of them"
        )
    return layers.index(block)


def gt_cell_fraction(mask: np.ndarray, class_id: int, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each token cell's pixels that are ``class_id`` (the image is resized to a square grid).

    Cells are torch's adaptive-average-pooling bins: rows floor(i*H/gh) .. ceil((i+1)*H/gh), same for
    columns; computed with an integral image (no torch threads)."""
    m = (np.asarray(mask) == class_id).astype(np.float64)
    h, w = m.shape
    gh, gw = (int(g) for g in grid)
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = m.cumsum(0).cumsum(1)
    r0 = (np.arange(gh) * h) // gh
    r1 = -((-(np.arange(gh) + 1) * h) // gh)
    c0 = (np.arange(gw) * w) // gw
    c1 = -((-(np.arange(gw) + 1) * w) // gw)
    total = integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0]
    area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    return (total / area).astype(np.float32)


def build(
    name: str,
    store: Any,
    labeler: Any,
    index: pd.DataFrame,
    layer: int = -1,
    gate: bool = True,
    stats: Sequence[str] = STATS,
    token_cache: LRUCache | None = None,
    complement: set[int] | None = None,
) -> MapBaseline:
    """A baseline by name (see BASELINES); prototype baselines on the same layer may share ``token_cache``.
    ``complement``: stuff classes whose image-level maps are complemented
    (`fscs.learn.targets.complement_classes`).
    """
    if name == "attention":
        center = bool(getattr(labeler, "center_keys", False))
        return AttentionBaseline(store, center_keys=center, complement=complement, gate=gate, stats=stats)
    if name in ("prototype", "prototype_gt"):
        return PrototypeBaseline(
            store,
            labeler=labeler,
            index=index,
            support_mask="pseudo" if name == "prototype" else "gt",
            layer=layer,
            token_cache=token_cache,
            complement=complement,
            gate=gate,
            stats=stats,
        )
    raise FscsError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


def run_baselines(
    names: Sequence[str],
    fold: int,
    test_episodes: pd.DataFrame,
    val_episodes: pd.DataFrame,
    index: pd.DataFrame,
    folds: dict[str, Any],
    store: Any,
    labeler: Any,
    void: str = "ignore",
    layer: int = -1,
    gate: bool = True,
    stats: Sequence[str] = STATS,
    token_bytes: int | None = None,
    progress: bool = True,
    complement: set[int] | None = None,
) -> dict[str, Any]:
    """Calibrate each baseline on the fold's validation episodes, score it on its test episodes.

    Returns the baselines file: ``{"fold", "void", "baselines": {name: {"1way1shot": {"er", "miou",
    "fbiou", "episodes"}, ...}}, "per_class_iou": {name: {setting: {"<id>": iou}}},
    "calibration": {name: {"supervision", "rules": {setting: rule}}}}``. ``token_bytes``: the budget of the
    patch tokens the prototype baselines share (None: keep all).
    """
    from fscs.evaluation.episodes import evaluation_json, run_episodes

    test_classes = fold_classes(folds, fold, "test")
    train_classes = fold_classes(folds, fold, "train")
    leaked = sorted({int(c) for cs in val_episodes["support_classes"] for c in cs} & set(test_classes))
    if leaked:
        raise FscsError(
            f"validation episodes of fold {fold} use test classes {leaked}; refusing to calibrate"
        )
    out: dict[str, Any] = {
        "fold": int(fold),
        "void": void,
        "baselines": {},
        "per_class_iou": {},
        "calibration": {},
    }
    val_settings = {setting_key(w, k) for w, k in zip(val_episodes["way"], val_episodes["shot"], strict=True)}
    test_settings = {
        setting_key(w, k) for w, k in zip(test_episodes["way"], test_episodes["shot"], strict=True)
    }
    pooled = not test_settings <= val_settings  # a fallback rule is needed only for settings val lacks
    shared = LRUCache(max_bytes=token_bytes)  # the prototype baselines read the same tokens
    for name in names:
        baseline = build(
            name,
            store,
            labeler,
            index,
            layer=layer,
            gate=gate,
            stats=stats,
            token_cache=shared,
            complement=complement,
        )
        baseline.calibrate(val_episodes, index, train_classes, void=void, progress=progress, pooled=pooled)
        results = run_episodes(
            test_episodes, baseline, index, test_classes, void=void, progress=progress, desc=f"test {name}"
        )
        ev = evaluation_json(fold, None, void, results)
        out["baselines"][name] = ev["results"]
        out["per_class_iou"][name] = ev["per_class_iou"]
        out["calibration"][name] = {"supervision": SUPERVISION[name], "rules": baseline.calibration}
    return out
