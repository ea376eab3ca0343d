"""Benchmark CST training and evaluation from the feature store against re-encoding images every episode.

    python -m benchmarks.train [--backbone NAME] [--input-size 224] [--features data/features/msrc.h5]
                               [--batches 3] [--batch 12] [--threads 2] [--eval-episodes 8]

The reference code runs the frozen backbone on the query and the support image of every training episode.
Here training reads stored tokens. Both designs run in this process, same threads, same model
initialisation, same 1-way 1-shot episodes (MSRC train split, fold 0 training classes, GT supervision so no
pseudo-label files are needed), same CST training step (forward, loss, backward, Adam):

- ``re-encode``: decode both images, preprocess, backbone forward (no grad), then the same CST step;
- ``store``: tokens from RAM (`TokenBank`, loaded once), normalised / split into heads / downsampled every
  batch (the design before the prepared-feature cache);
- ``cache``: prepared features computed once per image (`fscs.learn.predictor.PreparedBank`, as training
does);
  at the old batch size 12, at the default, under bf16 autocast and with 2 attention heads instead of 8
  (those two measured only: training runs fp32 with 8 heads), all with torch's attention (SDPA); last, the
  default: the fused attention kernel (`fscs.learn.model.fused_attention`).

Rows: episodes/s (after one warm-up batch, mean over the timed batches), seconds per episode, the ratio to
the "before" row, GFLOP per episode (forward + backward, torch's FlopCounterMode) and the fraction of the
fp32 matmul peak measured in the same process, and the peak RSS while the row ran (Linux: reset per row). Then
evaluation: `CSTPredictor.predict` episodes/s per (way, shot) on test episodes (fresh predictor: no pair
cache hits), the pairs/s behind it, and the same episodes with re-encoding every image of every episode.
Last, pair scoring as the evaluate stage runs it (`CSTPredictor.prefetch` over test episodes of all four
types, best of two fresh predictors per row): one batch at a time with ``--threads`` torch threads per op
(before), ``--threads`` single-threaded workers, the same with `fscs.core.allocator` keeping freed memory
(applied from the third row on: it cannot be undone in a process), the same with the fused attention kernel,
and the kernel one batch at a time on ``--threads`` threads (`fscs.learn.predictor.scoring_workers`: the
kernel parallelises its problems itself), with the largest foreground-probability difference to the first row
(one torch thread per op rounds differently from two; the kernel rounds differently from SDPA).

Without ``--features`` (or when it was made with another backbone) the needed images are extracted into a
temporary store first (not timed). The default backbone is params.yaml's (the offline DINOv2 ViT-S/14 at
224); ``vit_tiny_random`` is used when it cannot be built. Numbers on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from fscs.core.errors import FscsError


def matmul_peak_gflops(threads: int, repeats: int = 20) -> float:
    """fp32 GFLOP/s of a ViT-shaped GEMM (4096x1536 @ 1536x384) on ``threads`` threads, best of the runs."""
    torch.set_num_threads(threads)
    a, b = torch.randn(4096, 1536), torch.randn(1536, 384)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096 * 1536 * 384 / best / 1e9


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_backbone(name: str, input_size: int) -> Any:
    from fscs.features.backbone import create_backbone

    try:
        return create_backbone(name, input_size)
    except Exception as exc:  # noqa: BLE001 - fall back to the tiny backbone, say so
        print(f"backbone {name!r} unavailable ({exc}); using vit_tiny_random")
        return create_backbone("vit_tiny_random", 64)


def open_store(path: str | None, backbone: Any, ids: list[str], paths: list[str], tmp: Path) -> Any:
    from fscs.features.extraction import extract_to_store
    from fscs.features.store import FeatureStore

    if path and Path(path).is_file():
        store = FeatureStore(path)
        same = all(
            store.attrs.get(k) == v
            for k, v in backbone.store_attrs().items()
            if k in ("backbone", "input_size")
        )
        if same and all(i in store for i in ids):
            return store
        store.close()
        print(f"{path}: other backbone or images missing; extracting the benchmark images")
    out = tmp / "bench.h5"
    extract_to_store(backbone, ids, paths, out, batch_size=8, progress=False)
    return FeatureStore(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--backbone", default=None, help="default: params.yaml backbone.name")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--index", default="data/index/msrc.parquet")
    parser.add_argument("--folds", default="data/episodes/msrc/folds.json")
    parser.add_argument("--episodes", default="data/episodes/msrc")
    parser.add_argument("--features", default="data/features/msrc.h5")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--batch", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per row (plus one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-episodes", type=int, default=8, help="test episodes per (way, shot)")
    parser.add_argument(
        "--scoring-episodes", type=int, default=40, help="test episodes per (way, shot) for pair scoring"
    )
    args = parser.parse_args(argv)

    from fscs.config.params import load_config
    from fscs.core.allocator import keep_freed_memory
    from fscs.data.episodes import TrainEpisodeSampler, read_episodes
    from fscs.data.folds import fold_classes, read_folds
    from fscs.data.images import load_rgb
    from fscs.data.index import read_index
    from fscs.learn.model.cst import CST, config_from_store, count_parameters
    from fscs.learn.predictor import CSTPredictor, PreparedBank, TokenBank
    from fscs.learn.targets import Targets
    from fscs.learn.train import Batcher, episode_loss

    config = load_config(args.params)
    cfg = config.train.for_supervision("pixel")  # GT targets below
    bb = config.backbone
    name = args.backbone or (bb.name if bb else "vit_tiny_random")
    input_size = int(args.input_size or (bb.input_size if bb else 224))
    bs = int(args.batch or cfg.batch_size)
    torch.set_num_threads(args.threads)

    index = read_index(args.index)
    folds = read_folds(args.folds)
    classes = fold_classes(folds, args.fold, "train")
    sampler = TrainEpisodeSampler(index.reset_index(drop=True), classes, folds["train_split"], seed=123)
    rng = np.random.Generator(np.random.PCG64(123))
    train_eps = [sampler.sample(rng) for _ in range(max(bs, 12) * (args.batches + 1))]
    test = read_episodes(Path(args.episodes) / "test.parquet")
    test = test[test["fold"] == args.fold]
    eval_eps = {
        (w, s): test[(test["way"] == w) & (test["shot"] == s)].head(args.eval_episodes)
        for w, s in sorted(set(zip(test["way"], test["shot"], strict=True)))
    }
    scoring_eps = test.groupby(["way", "shot"]).head(args.scoring_episodes)
    test_eps = [*eval_eps.values(), scoring_eps]
    ids = sorted(
        {e.query_id for e in train_eps}
        | {e.support_ids[0][0] for e in train_eps}
        | {str(q) for df in test_eps for q in df["query_id"]}
        | {str(s) for df in test_eps for ss in df["support_ids"] for sh in ss for s in sh}
    )
    paths = [str(index.loc[i, "image_path"]) for i in ids]

    backbone = build_backbone(name, input_size)
    layers = bb.layers if bb else "all"
    with tempfile.TemporaryDirectory() as tmpdir:
        store = open_store(args.features, backbone, ids, paths, Path(tmpdir))
        tokens = TokenBank(store)  # every image held: the benchmark times compute, not reads
        model_cfg = config_from_store(store, **cfg.model)
        targets = Targets("pixel", index, cfg.label_size)
        prepared = PreparedBank(CST(model_cfg), tokens)  # preparing has no parameters: any model does
        batcher = Batcher(prepared, targets)
        for e in train_eps:  # GT masks and prepared features made once, outside the timings
            batcher([e])
        print(
            f"backbone {backbone.name} @ {input_size} ({backbone.grid[0]}x{backbone.grid[1]} tokens), CST "
            f"support grid {model_cfg.support_size}, {args.threads} threads, label size {cfg.label_size}"
        )

        def encode(image_ids: list[str]) -> torch.Tensor:
            with torch.no_grad():
                x = backbone.preprocess_batch([load_rgb(index.loc[i, "image_path"]) for i in image_ids])
                return backbone.extract(x, layers).tokens

        def features(model: CST, chunk: list, source: str) -> tuple[torch.Tensor, torch.Tensor]:
            """Prepared (query, support) features the way each design gets them."""
            if source == "cache":
                return prepared.get("query", [e.query_id for e in chunk]), prepared.get(
                    "support", [e.support_ids[0][0] for e in chunk]
                )
            get = encode if source == "re-encode" else tokens.get
            q, s = get([e.query_id for e in chunk]), get([e.support_ids[0][0] for e in chunk])
            return model.prepare_query(q), model.prepare_support(s)

        def run_row(
            source: str, batch: int, attention: str, bf16: bool = False, heads: int | None = None
        ) -> tuple[float, float, float]:
            """(episodes/s, GFLOP per episode, peak RSS MB) of Adam steps on ``batch``-episode batches;
            ``attention``: fused kernel or torch's SDPA; ``heads``: another number of attention heads."""
            torch.manual_seed(0)
            model = CST(replace(model_cfg, attn_heads=heads or model_cfg.attn_heads, attention=attention))
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            times, flops = [], 0.0
            reset_peak_rss()
            for b in range(args.batches + 1):
                chunk = train_eps[b * batch : (b + 1) * batch]
                t0 = time.perf_counter()
                _, _, m, target, presence, prior = batcher(chunk)
                counter = FlopCounterMode(display=False) if b == 0 else contextlib.nullcontext()
                with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    q, s = features(model, chunk, source)
                    loss = episode_loss(model, q, s, m, target, presence, cfg.cls_weight, prior)
                    opt.zero_grad()
                    loss.backward()
                opt.step()
                if b == 0:
                    flops = counter.get_total_flops() / len(chunk)
                else:
                    times.append(time.perf_counter() - t0)
            return batch * len(times) / sum(times), flops / 1e9, peak_rss_mb()

        peak = matmul_peak_gflops(args.threads)
        designs = {
            "re-encode every episode (reference design)": ("re-encode", 12, "sdpa"),
            "store, tokens re-prepared every batch (before)": ("store", 12, "sdpa"),
            "store + prepared-feature cache, batch 12": ("cache", 12, "sdpa"),
            f"store + prepared-feature cache, batch {bs}": ("cache", bs, "sdpa"),
            "store + prepared-feature cache, bf16 autocast (not used)": ("cache", bs, "sdpa", True),
            "store + prepared-feature cache, 2 attention heads (not used)": ("cache", bs, "sdpa", False, 2),
            f"store + prepared-feature cache, batch {bs}, fused attention kernel (default)": (
                "cache",
                bs,
                "fused",
            ),
        }
        rows = {label: run_row(*spec) for label, spec in designs.items()}
        base = rows["store, tokens re-prepared every batch (before)"][0]
        print(f"\nTraining, 1-way 1-shot episodes, CST {count_parameters(CST(model_cfg))} parameters")
        print(f"fp32 matmul peak measured in this process: {peak:.0f} GFLOP/s ({args.threads} threads)")
        print(
            "| design | episodes/s | s/episode | ratio to before | GFLOP/episode | % of fp32 peak "
            "| peak RSS MB |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, (eps, gflop, rss) in rows.items():
            print(
                f"| {label} | {eps:.2f} | {1 / eps:.3f} | {eps / base:.2f}x | {gflop:.2f} | "
                f"{100 * eps * gflop / peak:.0f}% | {rss:.0f} |"
            )

        torch.manual_seed(0)
        model = CST(model_cfg).eval()
        print("\nEvaluation (CSTPredictor.predict, no pair-cache hits)")
        print("| way-shot | episodes | episodes/s | pairs/s | re-encode episodes/s | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for (w, s), df in eval_eps.items():
            pred = CSTPredictor(
                model, tokens, targets.test_support_mask, True, batch_size=cfg.eval_batch_size
            )
            t0 = time.perf_counter()
            for row in df.itertuples():
                pred.predict(row.query_id, row.support_classes, row.support_ids)
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.inference_mode():
                for row in df.itertuples():
                    sup = [str(x) for sh in row.support_ids for x in sh]
                    qs = encode([row.query_id]).expand(len(sup), -1, -1, -1)
                    ss = encode(sup)
                    pairs = zip(row.support_classes, row.support_ids, strict=True)
                    masks = [targets.test_support_mask(x, c) for c, sh in pairs for x in sh]
                    model(qs, ss, torch.from_numpy(np.stack(masks)))
            dt_ref = time.perf_counter() - t0
            n = len(df)
            rate, pairs, ref = n / dt, pred.pairs_computed / dt, n / dt_ref
            print(f"| {w}-way {s}-shot | {n} | {rate:.2f} | {pairs:.1f} | {ref:.2f} | {rate / ref:.1f}x |")

        sdpa_model = CST(replace(model_cfg, attention="sdpa")).eval()
        sdpa_model.load_state_dict(model.state_dict())  # the same weights, torch's attention

        def score_row(workers: int, attention: str) -> tuple[float, float, dict]:
            """(pairs/s best of two fresh predictors, peak RSS MB, pair scores) of `CSTPredictor.prefetch`."""
            best, scores = 0.0, {}
            reset_peak_rss()
            scorer = model if attention == "fused" else sdpa_model
            for _ in range(2):
                pred = CSTPredictor(
                    scorer, tokens, targets.test_support_mask, True, cfg.eval_batch_size, workers=workers
                )
                t0 = time.perf_counter()
                n = pred.prefetch(scoring_eps, progress=False)
                best, scores = max(best, n / (time.perf_counter() - t0)), dict(pred._cache)
            return best, peak_rss_mb(), scores

        print(f"\nPair scoring (CSTPredictor.prefetch, {len(scoring_eps)} test episodes of all four types)")
        print("| design | pairs/s | ratio to before | max abs diff to before | peak RSS MB |")
        print("| --- | --- | --- | --- | --- |")
        rows = {
            f"one batch at a time, {args.threads} torch threads per op (before)": (1, False, "sdpa"),
            f"{args.threads} workers, one torch thread each": (args.threads, False, "sdpa"),
            f"{args.threads} workers + heap kept between batches": (args.threads, True, "sdpa"),
            "the same + fused attention kernel": (args.threads, True, "fused"),
            f"fused kernel, heap kept, one batch at a time on {args.threads} threads (as the stages run)": (
                1,
                True,
                "fused",
            ),
        }
        base_rate, base_scores = None, None
        for label, (workers, keep, attention) in rows.items():
            if keep:
                keep_freed_memory()  # from here on: a process cannot go back to glibc's adaptive defaults
            rate, rss, scores = score_row(workers, attention)
            base_rate, base_scores = base_rate or rate, base_scores or scores
            diff = max(float(np.abs(v[1] - base_scores[k][1]).max()) for k, v in scores.items())
            print(f"| {label} | {rate:.1f} | {rate / base_rate:.2f}x | {diff:.1e} | {rss:.0f} |")
        store.close()


if __name__ == "__main__":
    try:
        main()
    except FscsError as exc:
        raise SystemExit(f"error: {exc}") from None
