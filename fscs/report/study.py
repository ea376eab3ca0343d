"""The study's report: fold means and spread per setting, deltas vs. baselines, the paper's numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("er", "miou", "fbiou")

# Published CST / iFSL numbers (mean of 4 folds, 1-shot, ER / mIoU), METHOD.md §7.
PAPER = [
    ("Pascal-5i", "image", "CST, DINO ViT-S/8 @400", {"1way1shot": (79.9, 33.2), "2way1shot": (64.6, 31.9)}),
    ("Pascal-5i", "pixel", "CST, DINO ViT-S/8 @400", {"1way1shot": (85.7, 55.5), "2way1shot": (70.4, 53.7)}),
    ("COCO-20i", "image", "CST, DINO ViT-S/8 @400", {"1way1shot": (78.2, 19.6), "2way1shot": (62.4, 18.3)}),
    ("COCO-20i", "pixel", "CST, DINO ViT-S/8 @400", {"1way1shot": (80.8, 38.3), "2way1shot": (64.0, 36.2)}),
    ("Pascal-5i", "pixel", "iFSL ASNet, ResNet-50", {"1way1shot": (84.9, 52.3), "2way1shot": (68.3, 47.8)}),
    ("COCO-20i", "pixel", "iFSL ASNet, ResNet-50", {"1way1shot": (78.6, 35.8), "2way1shot": (63.1, 31.6)}),
]


def load_eval_dir(eval_dir: str | Path, supervisions: list[str], folds: list[int]) -> dict[str, Any]:
    """Read reports/eval/<setting>/fold<f>.json and baselines/fold<f>.json into {setting: {fold: results}}."""
    eval_dir = Path(eval_dir)
    runs: dict[str, dict[int, dict]] = {}
    for supervision in supervisions:
        runs[supervision] = {
            f: json.loads((eval_dir / supervision / f"fold{f}.json").read_text())["results"] for f in folds
        }
    for fold in folds:
        path = eval_dir / "baselines" / f"fold{fold}.json"
        if path.exists():
            for name, results in json.loads(path.read_text())["baselines"].items():
                runs.setdefault(f"baseline_{name}", {})[fold] = results
    return runs


def summarise(runs: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """Fold means (and standard deviations) of every metric, per setting and episode type."""
    summary: dict[str, Any] = {}
    for setting, by_fold in runs.items():
        folds = sorted(by_fold)
        kinds = sorted({k for f in folds for k in by_fold[f]}, key=_kind_order)
        entry: dict[str, Any] = {}
        for kind in kinds:
            values = {m: [by_fold[f][kind][m] for f in folds if kind in by_fold[f]] for m in METRICS}
            entry[kind] = {m: round(float(np.mean(v)), 2) for m, v in values.items()}
            entry[kind]["std"] = {m: round(float(np.std(v)), 2) for m, v in values.items()}
        entry["folds"] = {
            str(f): {k: {m: round(float(by_fold[f][k][m]), 2) for m in METRICS} for k in by_fold[f]}
            for f in folds
        }
        summary[setting] = entry
    return summary


def metrics_json(summary: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics file: short nested keys, fold means, per-fold values, no spread."""
    out = {}
    for setting, entry in summary.items():
        out[setting] = {k: {m: v[m] for m in METRICS} for k, v in entry.items() if k not in ("folds",)}
        out[setting]["folds"] = entry["folds"]
    return out


def summary_json(summary: dict[str, Any], setting: str) -> dict[str, Any]:
    """One setting's fold means under setting-free keys, so `dvc metrics diff` aligns two settings."""
    entry = summary[setting]
    return {"setting": setting} | {k: {m: v[m] for m in METRICS} for k, v in entry.items() if k != "folds"}


#: (learner, references it should beat, what the reference is): the comparisons that matter per setting
CLAIMS = (
    ("pixel", ("baseline_prototype_gt",), "the GT-mask prototype matcher"),
    ("image", ("baseline_attention", "baseline_prototype"), "the best image-level baseline"),
    ("mixed", ("image",), "the image-level learner"),
)


def claims(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each learner against its like-for-like reference, per episode type: the margins in ER and mIoU
    (learner minus the best reference) and whether both are positive."""
    rows = []
    for learner, refs, what in CLAIMS:
        present = [r for r in refs if r in summary]
        if learner not in summary or not present:
            continue
        for kind, v in summary[learner].items():
            if kind == "folds" or not all(kind in summary[r] for r in present):
                continue
            d_er = v["er"] - max(summary[r][kind]["er"] for r in present)
            d_miou = v["miou"] - max(summary[r][kind]["miou"] for r in present)
            rows.append(
                {
                    "learner": learner,
                    "reference": what,
                    "kind": kind,
                    "er": round(d_er, 2),
                    "miou": round(d_miou, 2),
                    "holds": d_er > 0 and d_miou > 0,
                }
            )
    return rows


def _table_head(kinds: list[str]) -> list[str]:
    """The header and rule lines of a setting x episode-type table."""
    return ["| setting | " + " | ".join(kinds) + " |", "| --- | " + " | ".join("---" for _ in kinds) + " |"]


def variant_rows(summary: dict[str, Any], records: list[dict[str, Any]], kinds: list[str]) -> list[str]:
    """Committed records of other measured learner variants (earlier default runs on the same episodes)
    beside the current learners: their ER / mIoU and the current learner's margin over them."""
    lines: list[str] = []
    for record in records:
        lines += [
            "",
            f"## Measured variant: {record['name']} (ER / mIoU; measured at commit {record['commit']})",
            "",
            f"{record['model']}. {record['how']} In brackets: the current default's margin over it "
            "(mIoU / ER points).",
            "",
            *_table_head(kinds),
        ]
        for setting, by_kind in record["metrics"].items():
            ours = summary.get(setting, {})
            cells = []
            for kind in kinds:
                ref, now = by_kind.get(kind), ours.get(kind)
                if ref is None:
                    cells.append("–")
                    continue
                cell = f"{ref['er']:.1f} / {ref['miou']:.1f}"
                if now is not None:
                    cell += f" ({now['miou'] - ref['miou']:+.1f} / {now['er'] - ref['er']:+.1f})"
                cells.append(cell)
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return lines


def _kind_order(kind: str) -> tuple[int, int]:
    way, shot = kind.replace("shot", "").split("way")
    return int(way), int(shot)


def markdown_report(summary: dict[str, Any], context: dict[str, Any]) -> str:
    """reports/README.md: settings side by side, deltas vs. the best baseline, the paper's numbers."""
    kinds = sorted({k for e in summary.values() for k in e if k != "folds"}, key=_kind_order)
    settings = [s for s in summary if not s.startswith("baseline_")]
    baselines = [s for s in summary if s.startswith("baseline_")]
    lines = [
        "# fscs results",
        "",
        f"Dataset **{context['dataset']}**, backbone **{context['backbone']}** at {context['input_size']}px "
        f"({context['grid']} tokens), folds {context['folds']}, {context['episodes']} test episodes per fold "
        f"and episode type, void pixels: **{context['void']}**. Mean over folds ± standard deviation across "
        "folds; percentages. Generated by `dvc repro report` from `reports/eval/`.",
        "",
        "## Settings side by side (ER / mIoU / FB-IoU)",
        "",
        *_table_head(kinds),
    ]
    for setting in settings + baselines:
        cells = []
        for kind in kinds:
            v = summary[setting].get(kind)
            cells.append(
                "–"
                if v is None
                else f"{v['er']:.1f}±{v['std']['er']:.1f} / {v['miou']:.1f}±{v['std']['miou']:.1f} / "
                f"{v['fbiou']:.1f}"
            )
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    if baselines and settings:
        lines += ["", "## Learner minus the best training-free baseline (mIoU / ER points)", ""]
        lines += _table_head(kinds)
        for setting in settings:
            cells = []
            for kind in kinds:
                best_miou = max(summary[b][kind]["miou"] for b in baselines if kind in summary[b])
                best_er = max(summary[b][kind]["er"] for b in baselines if kind in summary[b])
                v = summary[setting][kind]
                cells.append(f"{v['miou'] - best_miou:+.1f} / {v['er'] - best_er:+.1f}")
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    checked = claims(summary)
    if checked:
        lines += [
            "",
            "## Does each learner beat its like-for-like reference? (ER / mIoU points)",
            "",
            "pixel vs the GT-mask prototype, image vs the best image-level baseline (attention, prototype), "
            "mixed vs image; fold means. Training choices and their validation measurements: "
            "[LEARNER.md](LEARNER.md).",
            "",
            "| learner | reference | episode type | ER | mIoU | both ahead |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {c['learner']} | {c['reference']} | {c['kind']} | {c['er']:+.1f} | {c['miou']:+.1f} | "
            f"{'yes' if c['holds'] else 'no'} |"
            for c in checked
        ]
    lines += variant_rows(summary, context.get("variants") or [], kinds)
    lines += [
        "",
        "## Published numbers (mean of 4 folds, 1-shot, ER / mIoU)",
        "",
        "From the authors' READMEs (METHOD.md §7). They are **not** directly comparable with the table "
        "above: "
        "other datasets (PASCAL VOC / COCO vs. MSRC here), another backbone and resolution (DINO ViT-S/8 at "
        "400px, 50x50 tokens), checkpoint selection on the test episodes (we select on validation episodes), "
        "and void counted as background.",
        "",
        "| dataset | supervision | model | 1way1shot | 2way1shot |",
        "| --- | --- | --- | --- | --- |",
    ]
    for dataset, supervision, model, numbers in PAPER:
        cells = [f"{numbers[k][0]:.1f} / {numbers[k][1]:.1f}" for k in ("1way1shot", "2way1shot")]
        lines.append(f"| {dataset} | {supervision} | {model} | " + " | ".join(cells) + " |")
    if context.get("figures"):
        lines += ["", "## Qualitative results (query | GT | prediction per setting)", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in context["figures"]]
    return "\n".join(lines) + "\n"
