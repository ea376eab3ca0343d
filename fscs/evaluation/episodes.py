"""Running a predictor over fixed FS-CS episodes and scoring it (ER, mIoU, FB-IoU per way/shot setting).

A predictor is any object with ``predict(query_id, support_classes, support_ids) -> (presence_prob (N,),
fg_prob (N, h, w))``: the probability that each support class occurs in the query and its foreground
probability map at any resolution. The decision rules are fixed here, identical for every model and
baseline (METHOD.md section 5): class present iff presence_prob > 0.5; foreground maps are upsampled
bilinearly to the query's original size; pixel label = argmax over classes of fg_prob, background where that
maximum is below 0.5. Metrics: `fscs.evaluation.metrics`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm import tqdm

from fscs.core.errors import FscsError
from fscs.core.lru import LRUCache
from fscs.core.resample import bilinear_gather
from fscs.data.images import gt_mask
from fscs.evaluation.metrics import ClsMeter, SegMeter, check_void

EPISODE_COLUMNS = ("fold", "episode", "way", "shot", "query_id", "support_classes", "support_ids", "labels")
PRESENCE_THRESHOLD = 0.5
FG_THRESHOLD = 0.5


class Predictor(Protocol):
    def predict(
        self, query_id: str, support_classes: Sequence[int], support_ids: Sequence[Sequence[str]]
    ) -> tuple[np.ndarray, np.ndarray]: ...


def setting_key(way: int, shot: int) -> str:
    """'1way1shot', '2way5shot', ..."""
    return f"{int(way)}way{int(shot)}shot"


def load_episodes(path: str | os.PathLike, fold: int | None = None) -> pd.DataFrame:
    """Read an episodes Parquet file, check its columns, optionally keep one fold (error if it has none)."""
    try:
        df = pd.read_parquet(path)
    except FileNotFoundError as exc:
        raise FscsError(f"{path}: episodes file not found; run `dvc repro prepare`") from exc
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise FscsError(f"{path}: not a readable episodes Parquet file ({exc})") from exc
    missing = [c for c in EPISODE_COLUMNS if c not in df.columns]
    if missing:
        raise FscsError(f"{path}: episodes file lacks columns {missing}")
    if fold is not None:
        df = df[df["fold"] == int(fold)]
        if df.empty:
            raise FscsError(f"{path}: no episodes for fold {fold}")
    return df.reset_index(drop=True)


def decide(presence: np.ndarray, fg: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The shared decision rules: presence flags (N,) and the (H, W) episode label map (0 bg, 1..N)."""
    presence = np.asarray(presence, dtype=np.float64).reshape(-1)
    fg = np.asarray(fg)
    if fg.ndim != 3 or fg.shape[0] != presence.shape[0]:
        raise ValueError(f"expected fg maps (N, h, w) with N={presence.shape[0]}, got shape {fg.shape}")
    up = bilinear_gather(fg, size)
    best = up.max(axis=0)
    labels = (up.argmax(axis=0) + 1).astype(np.uint8)
    labels[best < FG_THRESHOLD] = 0
    return presence > PRESENCE_THRESHOLD, labels


def _num(x: float | None, digits: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), digits)


def run_episodes(
    episodes: pd.DataFrame,
    predictor: Predictor,
    index: pd.DataFrame,
    fold_classes: Iterable[int],
    void: str = "ignore",
    progress: bool | None = True,
    desc: str = "episodes",
    mask_cache: LRUCache | None = None,
) -> dict[str, dict[str, Any]]:
    """Score ``predictor`` on ``episodes`` (one fold), grouped by (way, shot).

    Returns ``{"1way1shot": {"er", "miou", "fbiou", "episodes", "per_class_iou": {"<id>": iou|None}}, ...}``
    with percentages in [0, 100] (None where undefined), settings sorted by (way, shot).
    ``fold_classes``: the classes mIoU averages over (the fold's test classes, or training classes for
    validation episodes). ``progress``: True/None shows a tqdm bar (quiet when not a TTY), False hides it.
    ``mask_cache``: an LRUCache that keeps ground-truth masks across calls (e.g. validation every epoch).
    """
    check_void(void)
    missing = [c for c in EPISODE_COLUMNS if c not in episodes.columns]
    if missing:
        raise FscsError(f"episodes lack columns {missing}")
    classes = [int(c) for c in fold_classes]
    unknown = sorted(set(map(str, episodes["query_id"])) - set(map(str, index.index)))
    if unknown:
        raise FscsError(
            f"image index: {len(unknown)} query ids of the episodes not found (first: {unknown[0]!r})"
        )
    gts = LRUCache(4096) if mask_cache is None else mask_cache
    meters: dict[tuple[int, int], tuple[ClsMeter, SegMeter]] = {}
    disable = True if progress is False else None  # None: tqdm stays quiet when not a TTY
    for ep in tqdm(episodes.itertuples(index=False), total=len(episodes), desc=desc, disable=disable):
        way, shot = int(ep.way), int(ep.shot)
        sup_classes = [int(c) for c in ep.support_classes]
        sup_ids = [[str(s) for s in shots] for shots in ep.support_ids]
        labels = [int(v) for v in ep.labels]
        if not (len(sup_classes) == len(sup_ids) == len(labels) == way):
            raise FscsError(f"episode {ep.episode} (fold {ep.fold}): way={way} but lists of other lengths")
        query = str(ep.query_id)
        presence, fg = predictor.predict(query, sup_classes, sup_ids)
        presence = np.asarray(presence, dtype=np.float64).reshape(-1)
        fg = np.asarray(fg)
        if presence.shape != (way,) or fg.ndim != 3 or fg.shape[0] != way:
            raise FscsError(
                f"predictor returned presence {presence.shape} and fg {fg.shape} for a {way}-way episode "
                f"(expected ({way},) and ({way}, h, w))"
            )
        gt = gts.get_or(query, partial(gt_mask, index, query, "; it cannot be scored"))
        present, pred = decide(presence, fg, gt.shape)
        cls_m, seg_m = meters.setdefault((way, shot), (ClsMeter(), SegMeter(classes, void)))
        cls_m.update(present, labels)
        seg_m.update(pred, gt, sup_classes)
    results: dict[str, dict[str, Any]] = {}
    for way, shot in sorted(meters):
        cls_m, seg_m = meters[(way, shot)]
        results[setting_key(way, shot)] = {
            "er": _num(cls_m.er()),
            "miou": _num(seg_m.miou()),
            "fbiou": _num(seg_m.fbiou()),
            "episodes": cls_m.episodes,
            "per_class_iou": {str(c): _num(v) for c, v in seg_m.per_class().items()},
        }
    return results


def evaluation_json(
    fold: int, supervision: str | None, void: str, results: dict[str, dict[str, Any]]
) -> dict:
    """The evaluation file of ARCHITECTURE.md: scores per setting plus per-class IoU per setting.

    ``supervision`` None leaves the key out (the baselines file nests one such dict per baseline).
    """
    out: dict[str, Any] = {"fold": int(fold)}
    if supervision is not None:
        out["supervision"] = supervision
    out["void"] = void
    out["results"] = {
        k: {m: v[m] for m in ("er", "miou", "fbiou", "episodes") if m in v} for k, v in results.items()
    }
    out["per_class_iou"] = {k: dict(v.get("per_class_iou", {})) for k, v in results.items()}
    return out
