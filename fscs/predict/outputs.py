"""The files `fscs predict` writes for an episode: per query its JSON, index PNG and overlay, per support
the overlay of the mask it was taught with, and ``predictions.json`` listing them all."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from fscs.predict.files import FilesPrediction
from fscs.predict.inputs import SupportSpec


def label_png(labels: np.ndarray, n_classes: int) -> Any:
    """The index PNG of a label map (0 background, i = class i) with the VOC palette, as a PIL image."""
    from PIL import Image

    from fscs.core.overlay import palette

    pal = [0] * 768
    for i in range(1, n_classes + 1):
        pal[3 * i : 3 * i + 3] = [round(255 * v) for v in palette(i)]
    im = Image.fromarray(labels, mode="P")
    im.putpalette(pal)
    return im


def safe_stem(path: str, used: set[str]) -> str:
    """A file-name-safe stem of ``path``, made unique among ``used`` (``_2``, ``_3`` ...) and added to it."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem) or "query"
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return name


def _query_doc(path: str, image: np.ndarray, name: str, q: Any, classes: list[str], shots: dict) -> dict:
    return {
        "query": str(path),
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "classes": [
            {
                "index": i,
                "name": c,
                "probability": round(float(q.presence[i - 1]), 6),
                "present": bool(q.present[i - 1]),
                "pixels": int((q.labels == i).sum()),
                "shots": shots[c],
            }
            for i, c in enumerate(classes, start=1)
        ],
        "mask": f"{name}_mask.png",
        "overlay": f"{name}_overlay.png",
    }


def write_predictions(
    out: Path, checkpoint: str, specs: list[SupportSpec], queries: list[str], prediction: FilesPrediction
) -> list[dict[str, Any]]:
    """Write every file of the episode into ``out`` (created); the query documents, in query order."""
    from PIL import Image

    from fscs.core.io import atomic_path, write_json

    result, classes = prediction.result, prediction.result.classes
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    stems = [safe_stem(path, used) for path in queries]
    supports_doc = []
    for i, (sp, taught) in enumerate(zip(specs, result.supports, strict=True)):
        name = f"support{i}_{safe_stem(sp.image, used)}_overlay.png"
        with atomic_path(out / name) as tmp:
            Image.fromarray(taught.overlay).save(tmp, format="PNG")
        supports_doc.append({"image": sp.image, "class": sp.cls, "mask": taught.mask, "overlay": name})
    summary = []
    for path, image, name, q in zip(queries, prediction.query_images, stems, result.queries, strict=True):
        doc = _query_doc(path, image, name, q, classes, result.shots)
        with atomic_path(out / f"{name}_mask.png") as tmp:
            label_png(q.labels, len(classes)).save(tmp, format="PNG")
        with atomic_path(out / f"{name}_overlay.png") as tmp:
            Image.fromarray(q.overlay).save(tmp, format="PNG")
        write_json(out / f"{name}.json", doc)
        summary.append(doc)
    write_json(
        out / "predictions.json",
        {
            "checkpoint": str(checkpoint),
            "backbone": prediction.predictor.model.config.backbone.get("backbone"),
            "classes": {str(i): c for i, c in enumerate(classes, start=1)},
            "presence": (
                f"relative to {len(prediction.references)} reference images"
                if prediction.references
                else "the checkpoint's threshold"
            ),
            "references": list(prediction.references),
            "supports": supports_doc,
            "queries": summary,
        },
    )
    return summary


def summary_line(summary: list[dict[str, Any]], n_classes: int, out: Path) -> str:
    """The one line `fscs predict` prints: per query the classes found, and where the files are."""
    found = ", ".join(
        f"{Path(d['query']).name}: {'+'.join(c['name'] for c in d['classes'] if c['present']) or 'none'}"
        for d in summary
    )
    return f"predict: {len(summary)} queries, {n_classes} classes ({found}) -> {os.fspath(out)}"
