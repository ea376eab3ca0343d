"""Support masks and query targets for CST training and evaluation, per supervision setting.

All masks are square, ``label_size`` x ``label_size`` (``train.label_size``): GT masks are resized with
nearest neighbour; pseudo-label maps (token-grid resolution) are upsampled bilinearly, then thresholded
(``fscs.pseudo.attention.to_mask``).

Training (what the learner is taught with):

- ``image``: support mask = raw self pseudo-mask; query target = pair pseudo-mask (support CLS vs query keys)
  if c is among the query's image-level labels, else all background.
- ``mixed``: images of the labelled subset use GT (support: GT == c; query: GT == c, void ignored); the
  others the enhanced pseudo-labels (support: enhanced self map; query: enhanced pair map if c is present,
  else all background).
- ``pixel``: support mask GT == c; query target GT == c, void (255) ignored.

Test time (`test_support_mask`; the support images of test episodes come from the test split, which no
setting has masks for except ``pixel``, whose learner was trained on GT support masks):
``pixel`` -> GT == c; ``image`` -> raw self pseudo-mask; ``mixed`` -> enhanced self pseudo-mask (the same
enhancer that labelled its training images). Pseudo support masks do not depend on the class.

Stuff classes (``pseudo.stuff_masks: complement``, classes named in ``pseudo.stuff_classes``): an attention
pseudo-mask covers the salient object, not the grass or sky around it, so for a stuff class the image and
mixed settings use its complement (support mask, query target when present, test support mask). Measured on
MSRC's training split: IoU with the stuff class's GT 0.41 for the complement against 0.17 for the mask in
images that also hold an object, 0.28 against 0.27 in stuff-only images (reports/README.md). It needs only
the class's name, which every episode has.

Query targets are uint8: 0 background, 1 foreground, 255 ignored. The presence label of class c is 1 iff c
is among the query's image-level labels (index ``classes``), as in the episode files.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fscs.config.supervision import SUPERVISIONS
from fscs.core.errors import FscsError
from fscs.core.lru import LRUCache
from fscs.core.resample import nearest_torch
from fscs.data.images import VOID, gt_mask

if TYPE_CHECKING:  # pydantic: kept out of the training loop's imports (GPU smoke)
    from fscs.config.params import PseudoConfig


def check_supervision(supervision: str) -> str:
    if supervision not in SUPERVISIONS:
        raise FscsError(f"supervision must be one of {', '.join(SUPERVISIONS)}, got {supervision!r}")
    return supervision


GT_MASK_BYTES = 256 * 2**20


class GtMasks:
    """GT label masks (uint8, 0 bg / class ids / 255 void) at ``size`` x ``size``, read once and kept up to
    `GT_MASK_BYTES` (all of MSRC's at 64 px; at the paper's 400 px, 1,600 of its 160 KB masks)."""

    def __init__(self, index: pd.DataFrame, size: int):
        self.index = index
        self.size = int(size)
        self._cache = LRUCache(max_bytes=GT_MASK_BYTES)

    def __call__(self, image_id: str) -> np.ndarray:
        return self._cache.get_or(image_id, partial(self._read, image_id))

    def _read(self, image_id: str) -> np.ndarray:
        mask = nearest_torch(gt_mask(self.index, image_id, ", but this setting needs its mask"), self.size)
        mask.setflags(write=False)
        return mask


class Targets:
    """Masks and labels for one supervision setting.

    index: the image index (``classes``, ``mask_path``); labeler: a ``fscs.pseudo.attention.Labeler`` for
    ``image`` (raw maps) and ``mixed`` (built with the enhancer); labelled_ids: the mixed setting's labelled
    subset.
    """

    def __init__(
        self,
        supervision: str,
        index: pd.DataFrame,
        label_size: int,
        labeler: Any = None,
        labelled_ids: set[str] | None = None,
        complement_classes: set[int] | None = None,
    ):
        self.supervision = check_supervision(supervision)
        self.index = index
        self.label_size = int(label_size)
        if supervision in ("image", "mixed") and labeler is None:
            raise FscsError(f"supervision '{supervision}' needs pseudo-labels (a Labeler)")
        if supervision == "mixed" and getattr(labeler, "enhancer", None) is None:
            raise FscsError("supervision 'mixed' needs the pseudo-label enhancer (Labeler(enhancer=...))")
        self.labeler = labeler
        self.labelled = set(labelled_ids or ()) if supervision == "mixed" else set()
        self.complement = {int(c) for c in complement_classes or ()} if supervision != "pixel" else set()
        self.gt = GtMasks(index, self.label_size)
        self._pseudo_support: dict[str, np.ndarray] = {}
        self._classes: dict[str, frozenset[int]] = {}

    # ---- labels -------------------------------------------------------------------------------------
    def classes(self, image_id: str) -> frozenset[int]:
        hit = self._classes.get(image_id)
        if hit is None:
            try:
                hit = frozenset(int(c) for c in self.index.loc[image_id, "classes"])
            except KeyError:
                raise FscsError(f"image index: image id {image_id!r} not found") from None
            self._classes[image_id] = hit
        return hit

    def presence(self, query_id: str, class_id: int) -> int:
        return int(int(class_id) in self.classes(query_id))

    # ---- masks --------------------------------------------------------------------------------------
    def _gt_fg(self, image_id: str, class_id: int) -> np.ndarray:
        return self.gt(image_id) == int(class_id)

    def _pseudo_support_mask(self, image_id: str) -> np.ndarray:
        hit = self._pseudo_support.get(image_id)
        if hit is None:
            hit = np.asarray(self.labeler.support_mask(image_id, self.label_size), dtype=bool)
            hit.setflags(write=False)
            self._pseudo_support[image_id] = hit
        return hit

    def _class_pseudo_mask(self, image_id: str, class_id: int) -> np.ndarray:
        """The self pseudo-mask, or its complement for a stuff class (see the module docstring)."""
        mask = self._pseudo_support_mask(image_id)
        return ~mask if int(class_id) in self.complement else mask

    def support_mask(self, image_id: str, class_id: int) -> np.ndarray:
        """Training support mask, bool (label_size, label_size)."""
        if self.supervision == "pixel" or image_id in self.labelled:
            return self._gt_fg(image_id, class_id)
        return self._class_pseudo_mask(image_id, class_id)

    def test_support_mask(self, image_id: str, class_id: int) -> np.ndarray:
        """Evaluation support mask, bool (label_size, label_size): GT for pixel, else the self pseudo-mask."""
        if self.supervision == "pixel":
            return self._gt_fg(image_id, class_id)
        return self._class_pseudo_mask(image_id, class_id)

    @property
    def test_mask_depends_on_class(self) -> bool:
        return self.supervision == "pixel" or bool(self.complement)

    def query_target(self, query_id: str, support_id: str, class_id: int) -> np.ndarray:
        """Training target of the query for the support's class: uint8 (label_size, label_size), 0/1/255."""
        if self.supervision == "pixel" or query_id in self.labelled:
            gt = self.gt(query_id)
            target = (gt == int(class_id)).astype(np.uint8)
            target[gt == VOID] = VOID
            return target
        present = bool(self.presence(query_id, class_id))
        if present and int(class_id) in self.complement:
            return (~self._pseudo_support_mask(query_id)).astype(np.uint8)
        return self.labeler.pair_mask(support_id, query_id, self.label_size, present=present).astype(np.uint8)


def labeler_kwargs(pseudo: PseudoConfig) -> dict[str, Any]:
    """Labeler keyword arguments from params' ``pseudo`` section (``cst_threshold`` -> ``threshold``; other
    keys passed through when the Labeler takes them, e.g. recipe, dino_mass, dino_heads, center_keys)."""
    import inspect

    from fscs.pseudo.attention import Labeler

    pseudo = pseudo.model_dump()
    accepted = set(inspect.signature(Labeler.__init__).parameters) - {
        "self",
        "store",
        "pseudo_path",
        "enhancer",
    }
    kw = {k: v for k, v in pseudo.items() if k in accepted and k != "fold"}
    if "cst_threshold" in pseudo:
        kw["threshold"] = float(pseudo["cst_threshold"])
    return kw


def targets_for(
    supervision: str,
    pseudo_config: PseudoConfig,
    store: Any,
    index: Any,
    label_size: int,
    *,
    fold: int,
    pseudo: str | None = None,
    enhancer: str | None = None,
    enhanced: str | None = None,
    for_training: bool = True,
    class_names: dict[int, str] | None = None,
) -> Targets:
    """The setting's `Targets` (with a Labeler for image / mixed); errors name a missing input file.

    ``for_training`` False: only test-time support masks are needed (no labelled subset for mixed).
    ``fold``: which fold's enhancer (evaluation passes the checkpoint's fold). ``class_names`` ({id: name},
    `fscs.data.folds.class_names`) is needed when ``pseudo.stuff_masks`` is ``complement``."""
    from fscs.pseudo.attention import Labeler

    sup = supervision
    if sup == "pixel":
        return Targets("pixel", index, label_size)
    kw = labeler_kwargs(pseudo_config)
    complement = complement_classes(pseudo_config, class_names)
    pseudo_path = pseudo if pseudo and Path(pseudo).is_file() else None
    if pseudo and pseudo_path is None:
        raise FscsError(f"{pseudo}: pseudo-label file not found; run `dvc repro pseudo`")
    if sup == "image":
        labeler = Labeler(store, pseudo_path, **kw)
        return Targets("image", index, label_size, labeler=labeler, complement_classes=complement)
    if not enhancer or (for_training and not enhanced):
        raise FscsError("supervision 'mixed' needs --enhancer and --enhanced (run `dvc repro enhancer`)")
    kw["recipe"] = "cst"  # the enhancer works on the cst recipe's per-head cosine maps
    from fscs.pseudo.enhancer import read_labelled_ids

    labelled = read_labelled_ids(enhanced) if for_training else set()
    labeler = Labeler(store, pseudo_path, enhancer=enhancer, fold=fold, **kw)
    return Targets(
        "mixed", index, label_size, labeler=labeler, labelled_ids=labelled, complement_classes=complement
    )


def complemented_names(pseudo: PseudoConfig) -> list[str] | None:
    """Class names whose pseudo-masks are complemented: ``pseudo.stuff_classes`` when ``pseudo.stuff_masks``
    is ``complement``; None under ``same`` (the default)."""
    return list(pseudo.stuff_classes) if pseudo.stuff_masks == "complement" else None


def complement_classes(pseudo: PseudoConfig, names: dict[int, str] | None) -> set[int]:
    """Class ids whose pseudo-masks are complemented: `complemented_names` matched to the dataset's names."""
    wanted = complemented_names(pseudo)
    if wanted is None:
        return set()
    if names is None:
        raise FscsError("pseudo.stuff_masks 'complement' needs the dataset's class names (folds.json)")
    unknown = sorted(set(wanted) - set(names.values()))
    if unknown:
        raise FscsError(f"params: pseudo.stuff_classes names unknown classes {unknown}")
    return {cid for cid, name in names.items() if name in wanted}
