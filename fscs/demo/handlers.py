"""The demo page's request handling, without Gradio: page inputs -> `fscs.predict.episode.predict_episode` ->
a reply.

Every problem with the inputs becomes a message on the page (the reply's ``error``), never an exception: the
server stays up and no traceback reaches the page.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fscs.core.errors import FscsError

if TYPE_CHECKING:
    from fscs.config.params import Config

log = logging.getLogger(__name__)

#: At most this many classes and support images per class on the page.
MAX_CLASSES, MAX_SHOTS = 2, 5


@dataclass
class SupportInput:
    image: str | None = None  # path of the uploaded image
    mask: str | None = None  # path of an uploaded mask PNG (non-zero pixels: the class)
    brush: np.ndarray | None = None  # (h, w) bool strokes painted on the image, at the editor's size


@dataclass
class ClassInput:
    name: str = ""
    stuff: bool = False
    supports: list[SupportInput] = field(default_factory=list)

    @property
    def used(self) -> bool:
        return bool(self.name.strip()) or any(s.image for s in self.supports)


@dataclass
class Reply:
    error: str | None = None
    summary: str = ""  # markdown: per class the probability, the decision, the shots and masks; the time
    overlay: np.ndarray | None = None  # (H, W, 3) uint8, the query in the VOC palette
    legend: str = ""  # html
    supports: list[tuple[np.ndarray, str]] = field(default_factory=list)  # overlays of the taught masks
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)


class Models:
    """One `fscs.predict.predictor.Predictor` (CST model and backbone) per checkpoint, built once per
    process."""

    def __init__(self, config: Config | None = None):
        self.config = config
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, checkpoint: str | Path) -> Any:
        from fscs.predict.predictor import Predictor

        key = str(checkpoint)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = Predictor(key, self.config)
            return self._loaded[key]


def brush_mask(editor: Any) -> np.ndarray | None:
    """The painted strokes of a Gradio ImageEditor value (``layers``: RGBA arrays) as one bool mask, or
    None when nothing was painted."""
    if not isinstance(editor, dict):
        return None
    layers = [np.asarray(layer) for layer in editor.get("layers") or [] if layer is not None]
    painted = [layer[..., 3] > 0 for layer in layers if layer.ndim == 3 and layer.shape[2] == 4]
    if not painted:
        return None
    mask = np.logical_or.reduce(painted)
    return mask if mask.any() else None


def _support_mask(s: SupportInput, image: np.ndarray, where: str, notes: list[str]) -> tuple[Any, str]:
    """(foreground (H, W) bool or None, where it came from) for one support; FscsError for a bad mask."""
    from fscs.core.resample import nearest
    from fscs.predict.inputs import load_mask_fg

    h, w = image.shape[:2]
    if s.mask:
        fg = load_mask_fg(s.mask, (h, w))  # a mask of another size is refused, as by `fscs predict`
        if not fg.any():
            raise FscsError(
                f"{where}: the mask PNG has no foreground pixels; upload a mask with the class in it, paint "
                "one, or leave both empty to use the pseudo-mask"
            )
        return fg, f"mask {Path(s.mask).name}"
    if s.brush is not None:
        fg = s.brush
        if fg.shape != (h, w):
            notes.append(
                f"{where}: the painted mask ({fg.shape[1]}x{fg.shape[0]}) was scaled to the image ({w}x{h})"
            )
            fg = nearest(fg.astype(np.uint8), (h, w)) > 0
        return fg, "painted"
    return None, ""


def _read_supports(classes: list[ClassInput], notes: list[str]) -> list[Any]:
    from fscs.data.images import load_rgb
    from fscs.predict.episode import Support

    used = [c for c in classes if c.used]
    if not used:
        raise FscsError("add a class: a name and at least one support image")
    names = [c.name.strip() for c in used]
    for k, (c, name) in enumerate(zip(used, names, strict=True), start=1):
        if not name:
            raise FscsError(f"class {k} has support images but no name")
        if not any(s.image for s in c.supports):
            raise FscsError(f"class '{name}' has no support image: upload at least one")
        if sum(bool(s.image) for s in c.supports) > MAX_SHOTS:
            raise FscsError(f"class '{name}': at most {MAX_SHOTS} support images")
    if len(set(names)) < len(names):
        raise FscsError(f"two classes are both named '{names[0]}': give each class its own name")
    supports = []
    for c, name in zip(used, names, strict=True):
        for j, s in enumerate(c.supports, start=1):
            if not s.image:
                if s.mask or s.brush is not None:
                    raise FscsError(f"class '{name}', support {j}: a mask without its image")
                continue
            where = f"class '{name}', support {j}"
            image = load_rgb(s.image)
            fg, source = _support_mask(s, image, where, notes)
            supports.append(Support(image, name, fg, c.stuff, source))
    return supports


def legend_html(classes: list[str]) -> str:
    """Colour swatches of the VOC palette with the class names (0 = background, uncoloured)."""
    from fscs.core.overlay import palette

    items = []
    for i, name in enumerate(classes, start=1):
        r, g, b = (round(255 * v) for v in palette(i))
        items.append(
            f'<span class="fscs-swatch"><span style="display:inline-block;width:1em;height:1em;'
            f'background:rgb({r},{g},{b});margin-right:.3em;vertical-align:middle"></span>'
            f"{html.escape(name)}</span>"
        )
    return " &nbsp; ".join(items)


def _summary(result: Any, predictor: Any, seconds: float, notes: list[str]) -> str:
    cfg = predictor.model.config
    rows = [
        "| class | presence probability | decision | shots | masks taught with |",
        "| --- | --- | --- | --- | --- |",
    ]
    q = result.queries[0]
    for i, name in enumerate(result.classes):
        kinds = sorted({s.mask for s in result.supports if s.cls == name})
        decision = "**present**" if q.present[i] else "absent"
        rows.append(
            f"| {html.escape(name)} | {q.presence[i]:.3f} | {decision} | {result.shots[name]} | "
            f"{html.escape(', '.join(kinds))} |"
        )
    rule = (
        f"Present when the probability is at least 0.5: the checkpoint's calibrated presence threshold "
        f"({float(cfg.presence_threshold):.3f}) is mapped to 0.5."
    )
    timing = f"Answered in {seconds:.2f} s."
    return "\n".join([*rows, "", rule, timing, *(f"- {n}" for n in notes)])


def answer(
    models: Models,
    checkpoint: str | Path | None,
    classes: list[ClassInput],
    query: str | None,
    alpha: float = 0.5,
) -> Reply:
    """Run one episode for the page. Never raises: a problem is the reply's ``error``."""
    from fscs.data.images import load_rgb
    from fscs.predict.episode import predict_episode

    notes: list[str] = []
    try:
        if not checkpoint:
            raise FscsError("choose a checkpoint")
        supports = _read_supports(classes[:MAX_CLASSES], notes)
        if not query:
            raise FscsError("upload a query image")
        query_image = load_rgb(query)
        t0 = time.perf_counter()
        predictor = models.get(checkpoint)
        result = predict_episode(predictor, supports, [query_image], alpha=alpha)
        seconds = time.perf_counter() - t0
    except FscsError as exc:
        return Reply(error=str(exc))
    except Exception as exc:  # noqa: BLE001 - the page gets a message, the log gets the traceback
        log.exception("demo request failed")
        return Reply(error=f"unexpected error ({type(exc).__name__}: {exc}); the server log has the details")
    return Reply(
        summary=_summary(result, predictor, seconds, notes),
        overlay=result.queries[0].overlay,
        legend=legend_html(result.classes),
        supports=[(s.overlay, f"{s.cls}: {s.mask}") for s in result.supports],
        seconds=seconds,
        notes=notes,
    )
