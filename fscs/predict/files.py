"""`predict_files`: the episode of `fscs predict` from files on disk; every image, mask and the checkpoint
is read and checked before the episode runs, so a bad input fails before any output is written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fscs.predict.episode import EpisodeResult, Support, predict_episode
from fscs.predict.inputs import SupportSpec, load_mask_fg
from fscs.predict.predictor import Predictor

if TYPE_CHECKING:
    from fscs.config.params import Config


@dataclass
class FilesPrediction:
    """An episode's result with what writing it needs: the predictor (its checkpoint's backbone) and the
    query images (their sizes)."""

    predictor: Predictor
    query_images: list[np.ndarray]
    result: EpisodeResult
    references: list[str]  # the reference images' paths (empty: the checkpoint's threshold decided)


def predict_files(
    checkpoint: str,
    specs: list[SupportSpec],
    queries: list[str],
    config: Config | None,
    stuff: list[str] | tuple[str, ...] = (),
    alpha: float = 0.5,
    references: list[str] | tuple[str, ...] = (),
) -> FilesPrediction:
    """Read the supports (with their masks), queries and reference images, build the checkpoint's Predictor,
    run the episode.

    ``stuff`` names stuff classes, joined by the params' ``pseudo.stuff_classes`` under its complement rule.
    ``references``: unlabelled images of the queries' domain; presence is then decided relative to them.
    """
    from fscs.data.images import load_rgb
    from fscs.learn.targets import complemented_names

    sup_images = [load_rgb(sp.image) for sp in specs]
    sup_fg = [
        load_mask_fg(sp.mask, im.shape[:2]) if sp.mask is not None else None
        for sp, im in zip(specs, sup_images, strict=True)
    ]
    query_images = [load_rgb(q) for q in queries]
    reference_images = [load_rgb(r) for r in references]
    predictor = Predictor(checkpoint, config)
    params_stuff = complemented_names(config.pseudo) if config is not None else None
    stuff_set = set(stuff) | set(params_stuff or ())
    supports = [
        Support(image, sp.cls, fg, sp.cls in stuff_set, sp.mask or "")
        for sp, image, fg in zip(specs, sup_images, sup_fg, strict=True)
    ]
    result = predict_episode(predictor, supports, query_images, alpha=alpha, references=reference_images)
    return FilesPrediction(predictor, query_images, result, list(references))
