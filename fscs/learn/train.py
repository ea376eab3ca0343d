"""Training CST on 1-way episodes read from the feature store (never the backbone).

- Episodes: the FS-CS protocol (`fscs.data.episodes`) on the train split and the fold's training classes;
  epoch e uses a fixed stream from ``Generator(PCG64([seed, fold, e]))``, unrelated to the seeds of the
  validation episode list (``seed + i``), so training never replays the validation episodes verbatim.
  ``shots`` gives the batches' shot counts in turn (1-shot only by default); K > 1 trains the ``joint``
  K-shot rule on K supports at once.
- Supervision: `fscs.learn.targets.Targets` (support masks, query targets, presence labels).
- Loss: ``cls_weight`` x CE(presence) + CE(segmentation, ignore 255), the segmentation logits upsampled
  bilinearly from 2x the token grid to ``label_size``. Adam, constant learning rate (or warmup + cosine).
- Weight averaging (``ema`` > 0): validation, selection and the kept checkpoint use a moving average of the
  weights over the steps (`weight_average`), which smooths the step-to-step noise of a constant rate.
- Selection: after every epoch, mIoU on the fold's 1-way 1-shot VALIDATION episodes (train split, training
  classes; never the test list), via `fscs.evaluation.episodes.run_episodes` and `CSTPredictor`; the best
  epoch's weights are kept; training stops after ``patience`` epochs without improvement (counted only once
  the best validation mIoU is above 0, see `improves`).
- Determinism: ``torch.manual_seed(seed)``, ``torch.use_deterministic_algorithms(True)``, a fixed thread
  count; two runs with the same inputs give bit-identical weights on the same machine.
- Device: ``FSCS_DEVICE`` (`fscs.core.device`); on CUDA the loss's upsampling and cross-entropy run through
  `fscs.core.deterministic` (torch has no deterministic CUDA backward for them).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from timm.utils.model_ema import ModelEmaV3
from tqdm import tqdm

from fscs.core.deterministic import cross_entropy, interpolate_bilinear
from fscs.core.device import describe, resolve_device
from fscs.core.errors import FscsError
from fscs.core.memory import budget_bytes
from fscs.core.resample import bilinear
from fscs.data.images import VOID
from fscs.learn.calibration import Records, calibrate
from fscs.learn.model.cst import CST, CSTConfig
from fscs.learn.predictor import CSTPredictor, PreparedBank, TokenBank, scoring_workers
from fscs.learn.targets import Targets

if TYPE_CHECKING:  # the params layer needs pydantic; the loop (and the GPU smoke) does not
    from fscs.config.params import TrainConfig
    from fscs.learn.cell import Cell

#: training steps between host reads of the loss (finiteness check, progress bar); also at each epoch's end
LOG_EVERY = 10

CURVE_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_er",
    "val_miou",
    "val_auc",
    "val_best_iou",
    "val_best_threshold",
    "val_fg_fraction",
    "val_er_cal",
    "val_miou_cal",
    "presence_threshold",
    "fg_threshold",
    "seconds",
)


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based) of ``total``."""
    if schedule == "constant":
        return 1.0
    n_warm = int(round(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    progress = (step - n_warm) / max(total - n_warm, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def improves(score: float | None, best: float | None) -> bool:
    """Whether a validation mIoU is a new best. While no epoch has scored above 0 (the model still predicts
    all background, common in the first epochs), a later epoch counts as no worse, so the most trained of
    those is kept; early stopping only starts counting once the best mIoU is positive."""
    s = -1.0 if score is None else float(score)
    b = -1.0 if best is None else float(best)
    return s > b or (b <= 0.0 and s >= b)


def weight_average(model: CST, decay: float) -> ModelEmaV3 | None:
    """The averaged copy of ``model`` that ``update(model, step)`` (1-based steps) moves: step 1 copies the
    weights, step t blends them in with weight 1 / t (a plain mean of all steps so far) until that falls
    to ``1 - decay``, then with ``1 - decay`` (an exponential moving average); None when ``decay`` is 0."""
    if decay <= 0.0:
        return None
    return ModelEmaV3(model, decay=float(decay), use_warmup=True, warmup_gamma=1.0, warmup_power=1.0)


def set_determinism(seed: int, threads: int) -> None:
    torch.manual_seed(int(seed))
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(threads))


def epoch_rng(seed: int, fold: int, epoch: int) -> np.random.Generator:
    """The episode stream of one epoch."""
    return np.random.Generator(np.random.PCG64([int(seed), int(fold), int(epoch)]))


def segmentation_loss(seg_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE over (bg, fg) logits (B, 2, h, w) upsampled to the target (B, S, S) size; 255 ignored.

    Mean over the non-ignored pixels of the batch (0 when there are none)."""
    logits = interpolate_bilinear(seg_logits, size=tuple(target.shape[-2:]))
    total = cross_entropy(logits, target, ignore_index=VOID, reduction="sum")
    count = (target != VOID).sum().clamp(min=1)
    return total / count


def episode_loss(
    model: CST,
    query: torch.Tensor,
    support: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    presence: torch.Tensor,
    cls_weight: float,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    shots: int = 1,
) -> torch.Tensor:
    """The training loss of a batch of prepared (query, support) features (see `PreparedBank`); ``prior``:
    the prepared (query, support) prior vectors when the model uses the prior map; ``shots``: supports per
    episode (consecutive in ``support`` and ``mask``)."""
    cls_logits, seg_logits = model.forward_prepared(query, support, mask, prior, shots)
    return cls_weight * cross_entropy(cls_logits, presence) + segmentation_loss(seg_logits, target)


class Batcher:
    """Turns 1-way K-shot episodes (one K per batch) into tensors: prepared features (the K supports of an
    episode consecutive), support masks, query targets, presence, and the prepared prior vectors (query,
    support) when the model uses the prior map (else None). A query's target is its target for the first
    shot (the pair pseudo-mask in the image setting; the GT mask whatever the shot in pixel)."""

    def __init__(self, tokens: PreparedBank, targets: Targets):
        self.tokens = tokens
        self.targets = targets

    def __call__(self, episodes: list[Any]) -> tuple[torch.Tensor, ...]:
        qs = [e.query_id for e in episodes]
        groups = [list(e.support_ids[0]) for e in episodes]
        ss = [s for g in groups for s in g]
        cs = [int(e.support_classes[0]) for e in episodes]
        t = self.targets
        masks = np.stack([t.support_mask(s, c) for g, c in zip(groups, cs, strict=True) for s in g])
        target = np.stack([t.query_target(q, g[0], c) for q, g, c in zip(qs, groups, cs, strict=True)])
        presence = [t.presence(q, c) for q, c in zip(qs, cs, strict=True)]
        query = self.tokens.get("query", qs)
        return (
            query,
            self.tokens.get("support", ss),
            torch.from_numpy(masks).to(query.device),
            torch.from_numpy(target.astype(np.int64)).to(query.device),
            torch.tensor(presence, dtype=torch.long).to(query.device),
            self.tokens.priors(qs, ss),
        )


@dataclass
class TrainResult:
    model: CST  # the best epoch's weights
    best_epoch: int
    best_val_miou: float | None
    curve: list[dict[str, Any]]
    seconds: float
    device: str  # where it was trained (recorded, never compared)


def pixel_signals(scores: np.ndarray, labels: np.ndarray, bins: int = 200) -> dict[str, float]:
    """Threshold-free views of foreground maps (pooled over pixels): ROC AUC, the best fixed-threshold
    foreground IoU and its threshold, and the fraction of pixels above 0.5.

    They tell "not learned" (AUC near 0.5) from "under-confident" (high AUC, best threshold far below 0.5,
    mIoU 0 at 0.5), which the 0.5-threshold mIoU alone cannot."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    b = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, bins - 1)
    pos = np.bincount(b[labels], minlength=bins)[::-1].cumsum()[::-1]  # pixels >= edge, per threshold
    neg = np.bincount(b[~labels], minlength=bins)[::-1].cumsum()[::-1]
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    out = {"fg_fraction": float((scores > 0.5).mean()) if scores.size else float("nan")}
    if n_pos == 0 or n_neg == 0:
        return {**out, "auc": float("nan"), "best_iou": float("nan"), "best_threshold": float("nan")}
    tpr = np.append(pos / n_pos, 0.0)
    fpr = np.append(neg / n_neg, 0.0)
    iou = pos / (n_pos + neg)
    best = int(np.argmax(iou))
    auc = float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2))
    return {**out, "auc": auc, "best_iou": float(iou[best]), "best_threshold": float(edges[best])}


def uncalibrated(model: CST) -> None:
    """Set the decision thresholds of ``model`` to 0.5 (the raw probabilities), as validation scores it."""
    model.config.presence_threshold = model.config.fg_threshold = 0.5


def validation_records(predictor: CSTPredictor, targets: Targets, episodes: pd.DataFrame) -> Records:
    """Per-episode presence probability, foreground map and GT (at the GT's size) of 1-way ``episodes`` of
    any shot count, as `fscs.learn.calibration.calibrate` reads them."""
    cls, lab, pres, fgs, gts = [], [], [], [], []
    for row in episodes.itertuples(index=False):
        c = int(row.support_classes[0])
        p, fg = predictor.predict(str(row.query_id), [c], [list(row.support_ids[0])])
        gt = targets.gt(str(row.query_id))
        target = (gt == c).astype(np.uint8)
        target[gt == VOID] = VOID
        cls.append(c), lab.append(bool(row.labels[0])), pres.append(float(p[0]))
        fgs.append(bilinear(fg[0], gt.shape)), gts.append(target)
    return Records(np.asarray(cls), np.asarray(lab), np.asarray(pres), np.stack(fgs), np.stack(gts))


def validate(
    model: CST,
    tokens: TokenBank,
    targets: Targets,
    val_episodes: pd.DataFrame,
    index: pd.DataFrame,
    classes: list[int],
    void: str,
    batch_size: int,
    workers: int = 1,
    prepared_bytes: int | None = None,
) -> dict[str, float | None]:
    """The model on validation episodes (1-way 1-shot rows) with the test-time mask rule: ER and mIoU as
    evaluated at the 0.5 thresholds, `pixel_signals` of the ungated foreground maps against the queries'
    GT, and the thresholds `fscs.learn.calibration.calibrate` chooses with the ER / mIoU they give.
    ``prepared_bytes``: the budget of the predictor's prepared features (None: keep all)."""
    from fscs.evaluation.episodes import run_episodes

    uncalibrated(model)
    predictor = CSTPredictor.for_targets(model, tokens, targets, batch_size, workers, prepared_bytes)
    predictor.prefetch(val_episodes, progress=False)
    res = run_episodes(val_episodes, predictor, index, classes, void=void, progress=False)
    r = res.get("1way1shot") or next(iter(res.values()))
    rec = validation_records(predictor, targets, val_episodes)
    keep = rec.gt != VOID
    sig = pixel_signals(rec.fg[keep], rec.gt[keep] == 1)
    cal = calibrate(rec, classes)
    return {
        "er": r["er"],
        "miou": r["miou"],
        **{k: round(v, 4) for k, v in sig.items()},
        "er_cal": cal["er"],
        "miou_cal": cal["miou"],
        "presence_threshold": cal["presence_threshold"],
        "fg_threshold": cal["fg_threshold"],
    }


def train(
    *,
    config: TrainConfig,
    tokens: TokenBank,
    model_config: CSTConfig,
    targets: Targets,
    index: pd.DataFrame,
    train_split: str,
    train_classes: list[int],
    fold: int,
    val_episodes: pd.DataFrame | None,
    void: str = "ignore",
    val_classes: list[int] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_model: Callable[[int, CST], None] | None = None,
    progress: bool | None = None,
    device: torch.device | None = None,
    prepared_bytes: int | None = None,
) -> TrainResult:
    """Train one CST model on ``device`` (default: `fscs.core.device.resolve_device`); returns the best
    epoch's model (on the CPU) and the learning curve.

    ``val_episodes``: 1-way 1-shot validation rows of this fold (None or empty: keep the last epoch);
    ``val_classes``: the classes their mIoU averages over (default: ``train_classes``);
    ``on_model(epoch, model)``: called with each epoch's validated weights (do not keep the object: copy it);
    ``prepared_bytes``: the budget of prepared features, half for training and half for validation (None:
    keep all; it never changes a number).
    """
    from fscs.data.episodes import TrainEpisodeSampler  # pydantic (via the index): kept out of the GPU smoke

    device = resolve_device() if device is None else device
    set_determinism(config.seed, config.threads)
    start = time.perf_counter()
    model = CST(model_config).to(device)
    average = weight_average(model, float(config.ema))
    judged = model if average is None else average.module  # the weights validated and kept
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config.lr))
    total_steps = config.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, config.schedule, float(config.warmup))
    )
    samplers = {  # a class with too few images for K shots still trains in the batches of fewer shots
        k: TrainEpisodeSampler(
            index.reset_index(drop=True),
            train_classes,
            train_split,
            way=1,
            shot=k,
            seed=config.seed,
            too_few="error" if k == 1 else "drop",
        )
        for k in dict.fromkeys(config.shots)
    }
    half = None if prepared_bytes is None else max(1, prepared_bytes // 2)  # training | validation
    batcher = Batcher(PreparedBank(model, tokens, half), targets)
    has_val = val_episodes is not None and len(val_episodes) > 0
    best_state, best_epoch, best_miou, since_best = None, 0, None, 0
    curve: list[dict[str, Any]] = []
    per_epoch = int(config.episodes_per_epoch)
    bs = int(config.batch_size)
    step = 0
    for epoch in range(1, int(config.epochs) + 1):
        t0 = time.perf_counter()
        model.train()
        rng = epoch_rng(config.seed, fold, epoch)
        shots = [config.shots[b % len(config.shots)] for b in range(math.ceil(per_epoch / bs))]
        batches = [  # drawn in order from the epoch's generator: with shots [1], the 1-shot stream as before
            [samplers[k].sample(rng) for _ in range(min(bs, per_epoch - b * bs))] for b, k in enumerate(shots)
        ]
        total, seen = 0.0, 0
        # on the device, no host sync per step: the float64 sum of loss x episodes (what the python float
        # sum did, bit for bit) and the losses since the last check, read back every LOG_EVERY steps
        total_dev = torch.zeros((), dtype=torch.float64, device=device)
        recent, n_recent = torch.empty(LOG_EVERY, dtype=torch.float64, device=device), 0
        bar = tqdm(total=per_epoch, desc=f"epoch {epoch}", unit="ep", disable=None if progress else True)
        for b, chunk in enumerate(batches):
            b0 = b * bs
            q, s, m, target, presence, prior = batcher(chunk)
            loss = episode_loss(model, q, s, m, target, presence, float(config.cls_weight), prior, shots[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if average is not None:
                average.update(model, step=step)
            total_dev += loss.detach().double() * len(chunk)
            recent[n_recent] = loss.detach()
            n_recent += 1
            seen += len(chunk)
            bar.update(len(chunk))
            if n_recent < LOG_EVERY and b0 + bs < per_epoch:
                continue
            # a non-finite loss found here has already gone through optimizer.step(), so the weights are
            # ruined; the run stops anyway, and the message names the first such step as a per-step check did
            back = torch.cat([total_dev.view(1), recent[:n_recent]]).cpu()  # the one sync of these steps
            total, losses = float(back[0]), back[1:]
            bad = torch.nonzero(~torch.isfinite(losses)).flatten()
            if bad.numel():
                i = int(bad[0])
                raise FscsError(
                    f"training diverged at epoch {epoch}, step {step - n_recent + i + 1} (loss "
                    f"{losses[i].item()}); the step size is set by train.lr = {config.lr!r}, train.schedule "
                    f"= {config.schedule!r} and train.warmup = {config.warmup!r}: lower train.lr"
                )
            n_recent = 0
            bar.set_postfix(loss=f"{total / seen:.4f}")
        bar.close()
        val: dict[str, Any] = {}
        if has_val:
            val = validate(
                judged,
                tokens,
                targets,
                val_episodes,
                index,
                train_classes if val_classes is None else val_classes,
                void,
                config.eval_batch_size,
                workers=scoring_workers(judged, int(config.threads)),
                prepared_bytes=half,
            )
        val_miou = val.get("miou_cal" if config.calibrate else "miou")
        row = {
            "epoch": epoch,
            "step": step,
            "lr": float(f"{optimizer.param_groups[0]['lr']:.3g}"),
            "train_loss": round(total / max(seen, 1), 6),
            **{(k if k.endswith("threshold") else f"val_{k}"): v for k, v in val.items()},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        curve.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if on_model is not None:  # this epoch's validated weights, e.g. to replay another selection rule
            on_model(epoch, judged)
        if best_state is None or not has_val or improves(val_miou, best_miou):
            best_state = copy.deepcopy(judged.state_dict())
            best_thresholds = (
                (val["presence_threshold"], val["fg_threshold"])
                if config.calibrate and has_val
                else (0.5, 0.5)
            )
            best_epoch, best_miou, since_best = epoch, val_miou, 0
        else:
            since_best += 1
            stop = since_best >= int(config.patience) > 0 and (best_miou or 0.0) > 0.0
            if stop and epoch >= int(config.min_epochs):
                break
    model.load_state_dict(best_state)
    model.config.presence_threshold, model.config.fg_threshold = best_thresholds
    model.eval().cpu()
    return TrainResult(model, best_epoch, best_miou, curve, time.perf_counter() - start, describe(device))


def train_cell(
    cell: Cell,
    config: TrainConfig,
    on_epoch: Any = None,
    progress: bool | None = None,
    device: Any = None,
    on_model: Any = None,
) -> TrainResult:
    """Train one CST model for a study cell (selection on its validation episodes) on ``device``, under the
    cell's memory budgets."""
    device = resolve_device() if device is None else device
    return train(
        config=config,
        tokens=cell.tokens,
        model_config=cell.model_config(config),
        targets=cell.targets,
        index=cell.index,
        train_split=cell.split,
        train_classes=cell.train_classes,
        fold=cell.fold,
        val_episodes=cell.val,
        void=cell.void,
        val_classes=cell.val_classes,
        on_epoch=on_epoch,
        on_model=on_model,
        progress=progress,
        device=device,
        prepared_bytes=budget_bytes(cell.memory.prepared_mb, "prepared", device),
    )
