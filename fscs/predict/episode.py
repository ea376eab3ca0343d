"""One N-way K-shot episode in memory (`predict_episode`): images and class names in, presence and label
maps out; shared by `fscs predict` (which writes files) and `fscs demo` (which shows a page)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fscs.core.errors import FscsError
from fscs.predict.predictor import Predictor


@dataclass
class Support:
    """One support image in memory: (H, W, 3) uint8, its class name, an optional given foreground (H, W)
    bool, whether a missing mask is the complement of the pseudo-mask (a stuff class), and its source."""

    image: np.ndarray
    cls: str
    fg: np.ndarray | None = None
    stuff: bool = False
    source: str = ""


@dataclass
class SupportResult:
    cls: str
    mask: (
        str  # where the mask came from: the given mask's source, "pseudo", or "pseudo, complemented (stuff)"
    )
    overlay: np.ndarray  # (H, W, 3) uint8: the mask the class was taught with, over the image


@dataclass
class QueryResult:
    # (N,) probabilities with the decision at 0.5: the checkpoint's calibrated threshold shifted onto it, or
    # with reference images the sigmoid of the score relative to them (`fscs.predict.reference`)
    presence: np.ndarray
    present: np.ndarray  # (N,) bool
    labels: np.ndarray  # (H, W) uint8: 0 background, i = class i
    overlay: np.ndarray  # (H, W, 3) uint8


@dataclass
class EpisodeResult:
    classes: list[str]  # class i + 1 is classes[i]
    shots: dict[str, int]
    supports: list[SupportResult]
    queries: list[QueryResult]


def _taught(
    supports: list[Support],
    masks: list[np.ndarray],
    complemented: list[bool],
    classes: list[str],
    alpha: float,
) -> list[SupportResult]:
    """Per support the mask its class was taught with (given or pseudo), at the image's size, as an
    overlay."""
    from fscs.core.overlay import overlay
    from fscs.core.resample import nearest_torch

    taught = []
    for sp, mask, comp in zip(supports, masks, complemented, strict=True):
        full = nearest_torch(mask.astype(np.uint8), sp.image.shape[:2]) * np.uint8(classes.index(sp.cls) + 1)
        kind = (
            (sp.source or "given")
            if sp.fg is not None
            else ("pseudo, complemented (stuff)" if comp else "pseudo")
        )
        taught.append(SupportResult(sp.cls, kind, overlay(sp.image, full, alpha=alpha)))
    return taught


def predict_episode(
    predictor: Predictor,
    supports: list[Support],
    queries: list[np.ndarray],
    alpha: float = 0.5,
    references: list[np.ndarray] | None = None,
) -> EpisodeResult:
    """One N-way K-shot episode per query image: the classes in the order they first appear among the
    supports; everything in memory (`fscs predict` writes it to files, `fscs demo` shows it).

    With ``references`` (unlabelled images of the queries' domain, most of them not showing the classes)
    presence is decided relative to them (`fscs.predict.reference`), not by the checkpoint's threshold."""
    from fscs.core.overlay import overlay
    from fscs.evaluation.episodes import decide
    from fscs.learn.calibration import log_odds, sigmoid
    from fscs.predict.reference import MIN_REFERENCES, reference_z

    references = list(references or [])
    if not supports:
        raise FscsError("no support images: give at least one support image per class")
    if references and len(references) < MIN_REFERENCES:
        raise FscsError(
            f"{len(references)} reference image(s): relative presence needs at least {MIN_REFERENCES} "
            "(8 or more unlabelled images of the queries' domain)"
        )
    classes: list[str] = []
    for sp in supports:
        if sp.cls not in classes:
            classes.append(sp.cls)
    enc = predictor.encode([sp.image for sp in supports] + list(queries) + references)
    ns = len(supports)
    complemented = [sp.fg is None and sp.stuff for sp in supports]
    masks = predictor.support_masks(enc[:ns], [sp.fg for sp in supports], complemented)
    episodes = predictor.episode_predictor(enc, {str(i): m for i, m in enumerate(masks)})
    support_ids = [[str(i) for i, sp in enumerate(supports) if sp.cls == c] for c in classes]
    class_ids = list(range(1, len(classes) + 1))
    nq = len(queries)
    ref_odds = [
        log_odds(episodes.predict(str(ns + nq + r), class_ids, support_ids)[0])
        for r in range(len(references))
    ]
    results = []
    for k, image in enumerate(queries):
        presence, fg = episodes.predict(str(ns + k), class_ids, support_ids)
        if references:
            presence = sigmoid(reference_z(log_odds(presence), np.stack(ref_odds))).astype(np.float32)
        present, labels = decide(presence, fg, image.shape[:2])
        results.append(QueryResult(presence, present, labels, overlay(image, labels, alpha=alpha)))
    taught = _taught(supports, masks, complemented, classes, alpha)
    shots = {c: len(ids) for c, ids in zip(classes, support_ids, strict=True)}
    return EpisodeResult(classes, shots, taught, results)
