"""Pseudo-label quality against GT masks: what the `pseudo` stage reports (and its self-map file).

Quality is measured on the TRAINING-split images only (the test split is never looked at), void ignored, at
each image's original size, classes = the folds' included classes; percentages:
- ``self``: for each image and each class c among its image-level labels, the self-map pseudo-mask vs GT == c
  (a proxy: the self map is class-agnostic, MSRC images hold ~2.6 classes incl. stuff);
- ``pair``: a fixed seeded set of (support, query, c) pairs (``pseudo.pairs_per_label`` supports per query
  label, other training images labelled c): the pair map (support CLS vs query keys) vs query GT == c; this is
  what the query targets use;
- ``objects``: per image, the self map vs the union of its object classes (classes not in
  ``pseudo.stuff_classes``), for images with at least one object class;
- recipes: ``cst`` with raw and with centred keys (``pseudo.center_keys``) over the threshold sweep, ``dino``
  over head rules and a mass sweep, and the all-foreground mask (the floor any recipe must beat).
The threshold sweep is diagnostic: a threshold chosen on GT masks would use pixel labels the image-level
setting does not have. Why the configured threshold is what it is: reports/CHOICES.md.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm import tqdm

from fscs.config.params import Config
from fscs.core.errors import FscsError
from fscs.core.iou import IoUCounter
from fscs.core.resample import bilinear
from fscs.data.images import VOID, gt_mask, has_mask
from fscs.features.store import FeatureStore
from fscs.pseudo.attention import DINO_HEADS, cst_foreground, dino_foreground, head_cosine


def pseudo_config(config: Config) -> dict:
    """The validated ``pseudo`` section as a dict; the sweeps always include the configured value, sorted."""
    cfg = config.pseudo.model_dump()
    cfg["sweep"] = sorted(set(cfg["sweep"]) | {cfg["cst_threshold"]})
    cfg["dino_mass_sweep"] = sorted(set(cfg["dino_mass_sweep"]) | {cfg["dino_mass"]})
    return cfg


def stuff_ids(names: list[str], folds: dict, where: str) -> set[int]:
    """Class ids of the ``pseudo.stuff_classes`` names; unknown names are an error naming ``where``."""
    by_name = {str(n): int(c) for c, n in folds["classes"].items()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise FscsError(f"params: pseudo.stuff_classes names {unknown}, not classes of {where}")
    return {by_name[n] for n in names}


def train_images(
    index: pd.DataFrame, folds: dict, store: FeatureStore, index_path: str
) -> dict[str, list[int]]:
    """{image_id: labels within the included classes} of the training split's images that have masks."""
    rows = index[(index["split"] == folds["train_split"]) & index["mask_path"].map(has_mask)]
    if len(rows) == 0:
        raise FscsError(
            f"{index_path}: no '{folds['train_split']}' images with masks to measure pseudo-labels on"
        )
    missing = [i for i in rows.index if i not in store]
    if missing:
        raise FscsError(
            f"{store.path}: {len(missing)} training images of {index_path} are not in the store "
            f"(first: {missing[0]!r}); re-run `dvc repro extract`"
        )
    included = {int(c) for c in folds["included"]}
    return {
        str(i): [int(c) for c in cs if int(c) in included]
        for i, cs in zip(rows.index, rows["classes"], strict=True)
    }


CST_VARIANTS = {"cst": False, "cst_centered": True}  # name -> center_keys


def measure(
    store: FeatureStore,
    index: pd.DataFrame,
    labels: dict[str, list[int]],
    cfg: dict,
    stuff: set[int],
    progress: bool = True,
) -> dict:
    """All quality numbers of the report (see module doc)."""
    sweep = cfg["sweep"]
    heads_variants = [(h, cfg["dino_mass"]) for h in DINO_HEADS]
    mass_variants = [(cfg["dino_heads"], m) for m in cfg["dino_mass_sweep"] if m != cfg["dino_mass"]]
    dino_variants = heads_variants + mass_variants
    kinds = ("self", "pair", "objects")
    cst = {name: {k: IoUCounter(sweep) for k in kinds} for name in CST_VARIANTS}
    dino = {v: {k: IoUCounter([0.5]) for k in kinds} for v in dino_variants}
    trivial = {k: IoUCounter([0.5]) for k in kinds}  # every pixel foreground: the floor to beat
    grid = store.grid
    pairs = sample_pairs(
        labels, sorted({c for cs in labels.values() for c in cs}), cfg["pairs_per_label"], cfg["seed"]
    )
    by_query: dict[str, list[tuple[str, int]]] = {}
    for s, q, c in pairs:
        by_query.setdefault(q, []).append((s, c))

    def add(kind: str, key, maps: dict, target: np.ndarray, valid: np.ndarray) -> None:
        for name in CST_VARIANTS:
            cst[name][kind].add(key, maps[name], target, valid)
        for v in dino_variants:
            dino[v][kind].add(key, maps[v], target, valid)
        trivial[kind].add(key, np.ones(target.shape, np.float32), target, valid)

    def up_maps(s_cls: np.ndarray, q_keys: np.ndarray, size: tuple[int, int]) -> dict:
        out = {
            name: bilinear(cst_foreground(head_cosine(s_cls, q_keys, center)).reshape(grid), size)
            for name, center in CST_VARIANTS.items()
        }
        for v in dino_variants:
            out[v] = bilinear(dino_foreground(s_cls, q_keys, v[1], v[0]).reshape(grid), size)
        return out

    for image_id in tqdm(sorted(labels), desc="pseudo quality", disable=None if progress else True):
        gt = gt_mask(index, image_id)
        valid = gt != VOID
        q_cls, q_keys = store.cls_query(image_id), store.patch_keys(image_id)
        maps = up_maps(q_cls, q_keys, gt.shape)
        objects = [c for c in labels[image_id] if c not in stuff]
        if objects:
            add("objects", "objects", maps, np.isin(gt, objects), valid)
        for c in labels[image_id]:
            add("self", c, maps, gt == c, valid)
        for s, c in by_query.get(image_id, []):
            add("pair", c, up_maps(store.cls_query(s), q_keys, gt.shape), gt == c, valid)

    def block(counter: IoUCounter, t: int) -> dict:
        return {"miou": counter.miou(t), "per_class": counter.per_class(t)}

    def objects_iou(counter: IoUCounter, t: int) -> float | None:
        v = counter.iou("objects", t)
        return None if v is None else round(v, 2)

    t_main = sweep.index(cfg["cst_threshold"])
    out: dict = {"pairs": len(pairs), "sweep": []}
    for i, t in enumerate(sweep):
        row: dict = {"threshold": t}
        for name in CST_VARIANTS:
            row[f"{name}_self"] = cst[name]["self"].miou(i)
            row[f"{name}_pair"] = cst[name]["pair"].miou(i)
            row[f"{name}_objects"] = objects_iou(cst[name]["objects"], i)
        out["sweep"].append(row)
    for name, center in CST_VARIANTS.items():
        best = {
            k: max(out["sweep"], key=lambda r, k=k: r[f"{name}_{k}"])["threshold"] for k in ("self", "pair")
        }
        out[name] = {
            "center_keys": center,
            "threshold": cfg["cst_threshold"],
            "self": block(cst[name]["self"], t_main),
            "pair": block(cst[name]["pair"], t_main),
            "objects_iou": objects_iou(cst[name]["objects"], t_main),
            "best_threshold": best,
        }
    main_v = (cfg["dino_heads"], cfg["dino_mass"])
    out["dino"] = {
        "mass": cfg["dino_mass"],
        "heads": cfg["dino_heads"],
        "self": block(dino[main_v]["self"], 0),
        "pair": block(dino[main_v]["pair"], 0),
        "objects_iou": objects_iou(dino[main_v]["objects"], 0),
        "variants": [
            {
                "heads": h,
                "mass": m,
                "self_miou": dino[(h, m)]["self"].miou(0),
                "pair_miou": dino[(h, m)]["pair"].miou(0),
                "objects_iou": objects_iou(dino[(h, m)]["objects"], 0),
            }
            for h, m in dino_variants
        ],
    }
    out["all_foreground"] = {
        "self_miou": trivial["self"].miou(0),
        "pair_miou": trivial["pair"].miou(0),
        "objects_iou": objects_iou(trivial["objects"], 0),
    }
    return out


def sample_pairs(
    labels: dict[str, list[int]], classes: list[int], per_label: int, seed: int
) -> list[tuple[str, str, int]]:
    """Seeded (support_id, query_id, class) pairs: for each image and each of its labels in ``classes``,
    ``per_label`` distinct other images having that class as supports (fewer when fewer exist)."""
    rng = np.random.default_rng(seed)
    ids = sorted(labels)
    holders = {int(c): [i for i in ids if int(c) in labels[i]] for c in classes}
    out = []
    for q in ids:
        for c in sorted(int(c) for c in labels[q] if int(c) in holders):
            others = [i for i in holders[c] if i != q]
            if not others:
                continue
            pick = rng.choice(len(others), size=min(per_label, len(others)), replace=False)
            out += [(others[int(j)], q, c) for j in sorted(pick)]
    return out


def self_maps(store: FeatureStore, center: bool) -> tuple[list[str], np.ndarray]:
    """(image ids, per-head self cosine maps (N, H, gh, gw) float16) of every image in the store, in order."""
    ids = list(store.image_ids)
    gh, gw = store.grid
    maps = np.zeros((len(ids), store.num_heads, gh, gw), dtype=np.float16)
    for r, image_id in enumerate(tqdm(ids, desc="self maps", disable=None)):
        cos = head_cosine(store.cls_query(image_id), store.patch_keys(image_id), center)
        maps[r] = cos.reshape(-1, gh, gw)
    return ids, maps


def self_maps_attrs(cfg: dict, prov: dict) -> dict:
    """Attributes of the pseudo-label file: the recipe params, what the maps are, the store's provenance."""
    return {
        "recipe": cfg["recipe"],
        "center_keys": cfg["center_keys"],
        "cst_threshold": cfg["cst_threshold"],
        "dino_mass": cfg["dino_mass"],
        "dino_heads": cfg["dino_heads"],
        "content": "per-head cosine of the last block's CLS query with the same image's patch keys"
        + (" (keys centred: mean patch key subtracted per head)" if cfg["center_keys"] else ""),
        **prov,
    }


def quality_report(cfg: dict, folds: dict, labels: dict[str, list[int]], res: dict, prov: dict) -> dict:
    """The stage's JSON report: the configured recipe's numbers first, then every recipe's (``measure``)."""
    cst_name = "cst_centered" if cfg["center_keys"] else "cst"
    main_block = res[cst_name] if cfg["recipe"] == "cst" else res["dino"]
    return {
        "recipe": cfg["recipe"],
        "center_keys": cfg["center_keys"],
        "threshold": cfg["cst_threshold"] if cfg["recipe"] == "cst" else None,
        "void": "ignore",
        "split": folds["train_split"],
        "images": len(labels),
        "labels": int(sum(len(v) for v in labels.values())),
        "pairs": res["pairs"],
        "self": main_block["self"],
        "pair": main_block["pair"],
        "objects": {"stuff_classes": cfg["stuff_classes"], "iou": main_block["objects_iou"]},
        "cst": res["cst"],
        "cst_centered": res["cst_centered"],
        "dino": res["dino"],
        "all_foreground": res["all_foreground"],
        "sweep": res["sweep"],
        "best_threshold": res[cst_name]["best_threshold"],
        "backbone": prov.get("backbone"),
    }


def sweep_rows(res: dict) -> list[list]:
    """Rows ``[threshold, recipe, miou]`` of the threshold-sweep CSV (cst variants x self/pair x sweep)."""
    return [
        [row["threshold"], f"{name}_{kind}", row[f"{name}_{kind}"]]
        for name in CST_VARIANTS
        for kind in ("self", "pair")
        for row in res["sweep"]
    ]
