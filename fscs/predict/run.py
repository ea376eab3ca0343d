"""`fscs predict`: few-shot classify and segment query images from a handful of labelled support images.

    fscs predict --checkpoint models/cst/pixel/fold0.pt \\
        --support cow1.jpg:cow --support cow2.jpg:cow:cow2_mask.png --support sheep.jpg:sheep \\
        --query field.jpg --query barn.jpg --out predictions/ [--params params.yaml]

Each ``--support IMG:CLASS[:MASK]`` adds one support image of CLASS (a free name; the classes are numbered
1..N in the order they first appear). MASK, when given, is a PNG whose non-zero pixels are the class's
foreground (a binary PNG or an index PNG; 255 counts as foreground too, as any non-zero value); otherwise the
support's self pseudo-mask (its own last-block CLS attention through `fscs.pseudo.attention.Labeler`, with the
``pseudo`` settings the checkpoint records, else those of --params, else the Labeler's defaults) is used, as
in image-level training; for a stuff class (``--stuff grass``, or params' ``pseudo.stuff_classes`` under
``stuff_masks: complement``) its complement, as image-level training and evaluation do. Support masks are
fed at the checkpoint's training mask size (``label_size``).
Several supports of a class make a K-shot episode (shots combined by the checkpoint's ``kshot`` rule and
thresholds, as in evaluation).
Images of any size are resized to the backbone's input size.

The checkpoint's config names the backbone (and its weights' sha256, precision): that backbone is built and
must match. It and the CST model run on ``FSCS_DEVICE`` (`fscs.core.device`).
Writes per query ``<name>.json`` (class names, presence probabilities, present flags, mask pixel counts),
``<name>_mask.png`` (index PNG at the query's original size: 0 background, i = class i, VOC palette) and
``<name>_overlay.png``, per support ``support<i>_<name>_overlay.png`` (the mask the class was taught with,
given or pseudo, so a user sees what each class was taught), plus ``predictions.json`` listing every query
and support. All inputs are read and checked before anything is written.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fscs.config.dicts import load_params
from fscs.config.params import checkpoint_label_size
from fscs.core.errors import FscsError
from fscs.core.provenance import check_provenance


@dataclass
class SupportSpec:
    image: str
    cls: str
    mask: str | None


def parse_support(spec: str) -> SupportSpec:
    """'IMG:CLASS' or 'IMG:CLASS:MASK' -> SupportSpec; FscsError for anything else."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise FscsError(
            f"--support {spec!r}: expected IMG:CLASS or IMG:CLASS:MASK "
            "(paths without ':', a non-empty class name)"
        )
    return SupportSpec(parts[0], parts[1].strip(), parts[2] if len(parts) == 3 else None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument(
        "--checkpoint", required=True, help="CST checkpoint (models/cst/<supervision>/fold<f>.pt)"
    )
    parser.add_argument(
        "--support",
        action="append",
        required=True,
        metavar="IMG:CLASS[:MASK]",
        help="a support image, its class name and optionally its mask PNG (repeat for more)",
    )
    parser.add_argument(
        "--query", action="append", required=True, metavar="IMG", help="a query image (repeat)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--params",
        default=None,
        help="params file: its pseudo section (support pseudo-masks), a backbone the checkpoint must match",
    )
    parser.add_argument(
        "--stuff",
        action="append",
        default=[],
        metavar="CLASS",
        help="a stuff class (grass, sky, ...): its supports without a mask use the complement of their "
        "pseudo-mask, as image-level training does (repeat; also pseudo.stuff_classes of --params when its "
        "pseudo.stuff_masks is complement)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")


# ---- loading and checks --------------------------------------------------------------------------------
def _load_mask_fg(path: str, shape: tuple[int, int]) -> np.ndarray:
    from fscs.data.images import WIDE_GREY, open_image

    with open_image(path, "mask") as im:
        arr = np.asarray(im.convert("L") if im.mode not in ("P", "L", "1", *WIDE_GREY) else im)
    if arr.ndim != 2:
        raise FscsError(f"{path}: mask must be a single-channel PNG, got shape {arr.shape}")
    if arr.shape != tuple(shape):
        raise FscsError(
            f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} but its image is {shape[1]}x{shape[0]} "
            "(width x height)"
        )
    return arr != 0


def check_backbone(backbone: Any, config_backbone: dict[str, Any], checkpoint: str, layers: Any) -> None:
    """FscsError unless the built backbone matches what the checkpoint was trained on."""
    have = backbone.store_attrs(layers)
    from fscs.learn.model.cst import BACKBONE_KEYS

    # A backbone built here extracts the checkpoint's layers itself; the store-layout keys do not apply.
    keys = [k for k in BACKBONE_KEYS if k not in ("layers", "normalization", "code_version")]
    check_provenance(
        have,
        {key: config_backbone[key] for key in keys if key in config_backbone},
        checkpoint,
        lambda key, got, want: (
            f"built for backbone attribute {key}={want!r}, but the backbone here has {got!r}; "
            "use a checkpoint trained with this backbone (or the same weights)"
        ),
    )


def check_sizes(model_config: Any, backbone: Any, layers: Any, checkpoint: str) -> None:
    """FscsError unless the backbone's tokens have the shape the CST weights expect (a checkpoint whose
    weights come from one backbone and whose config names another is refused here, before any work)."""
    have = {
        "num_layers": len(backbone.resolve_layers(layers)),
        "num_heads": int(backbone.num_heads),
        "embed_dim": int(backbone.provenance.embed_dim),
        "grid": tuple(int(g) for g in backbone.grid),
    }
    weights = {key: getattr(model_config, key) for key in have}
    check_provenance(
        have,
        {key: tuple(int(g) for g in v) if key == "grid" else int(v) for key, v in weights.items()},
        checkpoint,
        lambda key, got, want: (
            f"its CST weights expect {key}={want!r}, but the backbone its config names "
            f"({backbone.name} at {backbone.input_size}) gives {got!r}; the checkpoint's weights and "
            "config do not belong together"
        ),
    )


def recorded_pseudo(recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The ``pseudo`` settings a checkpoint records (Labeler keyword form) as params' ``pseudo`` keys."""
    out = dict(recorded or {})
    if "threshold" in out:
        out["cst_threshold"] = out.pop("threshold")
    return out


def _safe_stem(path: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem) or "query"
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return name


# ---- the run ------------------------------------------------------------------------------------------
class Predictor:
    """Checkpoint + its backbone: encode images, then episodes through `fscs.learn.predictor.CSTPredictor`.

    Support masks are made at the checkpoint's ``label_size`` (its training mask size; the input size for
    older checkpoints): GT masks by nearest-exact resizing (`fscs.core.resample.nearest_torch`), pseudo-masks
    by a
    `fscs.pseudo.attention.Labeler` with the params' ``pseudo`` settings overridden by those the checkpoint
    records.
    """

    def __init__(self, checkpoint: str, params: dict[str, Any] | None = None):
        from fscs.core.device import resolve_device
        from fscs.features.backbone import create_backbone
        from fscs.learn.model.cst import load_checkpoint

        self.checkpoint = str(checkpoint)
        self.params = dict(params or {})
        if not Path(checkpoint).is_file():
            raise FscsError(f"{checkpoint}: checkpoint not found")
        device = resolve_device()
        self.model, self.ckpt = load_checkpoint(checkpoint)
        self.model.to(device)
        bb = dict(self.model.config.backbone)
        if "backbone" not in bb or "input_size" not in bb:
            raise FscsError(f"{checkpoint}: checkpoint config does not name its backbone (config.backbone)")
        check_params_backbone(self.checkpoint, bb, self.params.get("backbone"))
        self.layers = list(bb["layers"]) if isinstance(bb.get("layers"), list) else "all"
        precision = str(bb.get("precision", "fp32"))
        self.backbone = create_backbone(
            str(bb["backbone"]), int(bb["input_size"]), bb.get("arch"), device=device, precision=precision
        )
        check_backbone(self.backbone, bb, self.checkpoint, self.layers)
        check_sizes(self.model.config, self.backbone, self.layers, self.checkpoint)
        config = self.ckpt.get("config", {})
        self.mask_size = checkpoint_label_size(self.ckpt, checkpoint)
        self.pseudo = {**(self.params.get("pseudo") or {}), **recorded_pseudo(config.get("pseudo"))}

    def encode(self, images: list[np.ndarray], batch_size: int = 8) -> list[dict[str, np.ndarray]]:
        """Tokens, CLS query and patch keys per image, rounded to float16 as in the feature store."""
        import torch

        out = []
        for i in range(0, len(images), batch_size):
            x = self.backbone.preprocess_batch(images[i : i + batch_size])
            f = self.backbone.extract(x, self.layers).cpu()
            for b in range(x.shape[0]):
                out.append(
                    {
                        "tokens": f.tokens[b].to(torch.float16).numpy(),
                        "cls_query": f.cls_query[b].to(torch.float16).numpy(),
                        "patch_keys": f.patch_keys[b].to(torch.float16).numpy(),
                    }
                )
        return out

    def support_masks(
        self, encs: list[dict[str, np.ndarray]], fgs: list[np.ndarray | None], stuff: list[bool]
    ) -> list[np.ndarray]:
        """Bool (label_size, label_size) masks: the given full-size foreground, else the self pseudo-mask
        (its complement where ``stuff``: attention covers the salient object, not the grass around it)."""
        from fscs.core.resample import nearest_torch
        from fscs.pseudo.attention import Labeler

        labeler = Labeler.from_params(_MemoryStore(encs, self.backbone), {"pseudo": self.pseudo})
        masks = []
        for i, (fg, is_stuff) in enumerate(zip(fgs, stuff, strict=True)):
            if fg is not None:
                masks.append(nearest_torch(np.asarray(fg, dtype=np.uint8), self.mask_size) > 0)
                continue
            pseudo = np.asarray(labeler.support_mask(str(i), self.mask_size), dtype=bool)
            masks.append(~pseudo if is_stuff else pseudo)
        return masks

    def episode_predictor(self, encs: list[dict[str, np.ndarray]], masks: dict[str, np.ndarray]) -> Any:
        """A CSTPredictor over the encoded images (ids "0", "1", ...) with the given support masks."""
        from fscs.learn.predictor import CSTPredictor, TokenBank

        bank = TokenBank(
            _MemoryStore(encs, self.backbone), [str(i) for i in range(len(encs))], progress=False
        )
        return CSTPredictor(self.model, bank, lambda image_id, class_id: masks[image_id])


def read_params(path: str | None) -> dict[str, Any]:
    """The params file when given (its ``pseudo`` and ``backbone`` sections are used), else {}."""
    return {} if path is None else load_params(path)


class _MemoryStore:
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


def check_params_backbone(
    checkpoint: str, config_backbone: dict[str, Any], bb: dict[str, Any] | None
) -> None:
    """FscsError when the params' backbone (name, input size) is not the one the checkpoint was built for."""
    if not bb:
        return
    for key, ck in (("name", "backbone"), ("input_size", "input_size")):
        if key in bb and ck in config_backbone and str(bb[key]) != str(config_backbone[ck]):
            raise FscsError(
                f"{checkpoint}: built for backbone {config_backbone.get('backbone')!r} at input size "
                f"{config_backbone.get('input_size')}, but the params ask for {bb.get('name')!r} at "
                f"{bb.get('input_size')}; use a checkpoint trained with the params' backbone"
            )


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
    presence: np.ndarray  # (N,) calibrated probabilities: the checkpoint's thresholds fall on 0.5
    present: np.ndarray  # (N,) bool
    labels: np.ndarray  # (H, W) uint8: 0 background, i = class i
    overlay: np.ndarray  # (H, W, 3) uint8


@dataclass
class EpisodeResult:
    classes: list[str]  # class i + 1 is classes[i]
    shots: dict[str, int]
    supports: list[SupportResult]
    queries: list[QueryResult]


def predict_episode(
    predictor: Predictor, supports: list[Support], queries: list[np.ndarray], alpha: float = 0.5
) -> EpisodeResult:
    """One N-way K-shot episode per query image: the classes in the order they first appear among the
    supports; everything in memory (`run` writes it to files, `fscs demo` shows it)."""
    from fscs.core.overlay import overlay
    from fscs.core.resample import nearest_torch
    from fscs.evaluation.episodes import decide

    if not supports:
        raise FscsError("no support images: give at least one support image per class")
    classes: list[str] = []
    for sp in supports:
        if sp.cls not in classes:
            classes.append(sp.cls)
    enc = predictor.encode([sp.image for sp in supports] + list(queries))
    ns = len(supports)
    complemented = [sp.fg is None and sp.stuff for sp in supports]
    masks = predictor.support_masks(enc[:ns], [sp.fg for sp in supports], complemented)
    episodes = predictor.episode_predictor(enc, {str(i): m for i, m in enumerate(masks)})
    support_ids = [[str(i) for i, sp in enumerate(supports) if sp.cls == c] for c in classes]
    results = []
    for k, image in enumerate(queries):
        presence, fg = episodes.predict(str(ns + k), list(range(1, len(classes) + 1)), support_ids)
        present, labels = decide(presence, fg, image.shape[:2])
        results.append(QueryResult(presence, present, labels, overlay(image, labels, alpha=alpha)))
    taught = []
    for sp, mask, comp in zip(supports, masks, complemented, strict=True):
        full = nearest_torch(mask.astype(np.uint8), sp.image.shape[:2]) * np.uint8(classes.index(sp.cls) + 1)
        kind = (
            (sp.source or "given")
            if sp.fg is not None
            else ("pseudo, complemented (stuff)" if comp else "pseudo")
        )
        taught.append(SupportResult(sp.cls, kind, overlay(sp.image, full, alpha=alpha)))
    shots = {c: len(ids) for c, ids in zip(classes, support_ids, strict=True)}
    return EpisodeResult(classes, shots, taught, results)


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


def run(args: argparse.Namespace) -> None:
    from PIL import Image

    from fscs.core.io import atomic_path, write_json
    from fscs.data.images import load_rgb
    from fscs.learn.targets import complemented_names

    # 1. parse and read everything (errors before any output)
    specs = [parse_support(s) for s in args.support]
    params = read_params(args.params)
    sup_images = [load_rgb(sp.image) for sp in specs]
    sup_fg = [
        _load_mask_fg(sp.mask, im.shape[:2]) if sp.mask is not None else None
        for sp, im in zip(specs, sup_images, strict=True)
    ]
    query_images = [load_rgb(q) for q in args.query]
    predictor = Predictor(args.checkpoint, params)

    # 2. one N-way K-shot episode per query
    stuff = set(args.stuff) | set(complemented_names(params) or ())
    supports = [
        Support(image, sp.cls, fg, sp.cls in stuff, sp.mask or "")
        for sp, image, fg in zip(specs, sup_images, sup_fg, strict=True)
    ]
    result = predict_episode(predictor, supports, query_images, alpha=args.alpha)
    classes = result.classes

    # 3. write
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    stems = [_safe_stem(path, used) for path in args.query]
    supports_doc = []
    for i, (sp, taught) in enumerate(zip(specs, result.supports, strict=True)):
        name = f"support{i}_{_safe_stem(sp.image, used)}_overlay.png"
        with atomic_path(out / name) as tmp:
            Image.fromarray(taught.overlay).save(tmp, format="PNG")
        supports_doc.append({"image": sp.image, "class": sp.cls, "mask": taught.mask, "overlay": name})
    summary = []
    for path, image, name, q in zip(args.query, query_images, stems, result.queries, strict=True):
        doc = {
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
                    "shots": result.shots[c],
                }
                for i, c in enumerate(classes, start=1)
            ],
            "mask": f"{name}_mask.png",
            "overlay": f"{name}_overlay.png",
        }
        with atomic_path(out / f"{name}_mask.png") as tmp:
            label_png(q.labels, len(classes)).save(tmp, format="PNG")
        with atomic_path(out / f"{name}_overlay.png") as tmp:
            Image.fromarray(q.overlay).save(tmp, format="PNG")
        write_json(out / f"{name}.json", doc)
        summary.append(doc)
    write_json(
        out / "predictions.json",
        {
            "checkpoint": str(args.checkpoint),
            "backbone": predictor.model.config.backbone.get("backbone"),
            "classes": {str(i): c for i, c in enumerate(classes, start=1)},
            "supports": supports_doc,
            "queries": summary,
        },
    )
    found = ", ".join(
        f"{Path(d['query']).name}: {'+'.join(c['name'] for c in d['classes'] if c['present']) or 'none'}"
        for d in summary
    )
    print(f"predict: {len(summary)} queries, {len(classes)} classes ({found}) -> {os.fspath(out)}")
