"""Benchmark the demo page's requests: seconds per episode with the model loaded once, against `fscs predict`.

    python -m benchmarks.demo [--workspace .] [--checkpoint models/cst/pixel/fold0.pt] [--repeat 5]

Episodes are the workspace's own test episodes (`fscs.demo.workspace.test_episodes`: the first of each type
in the checkpoint's fold, supports with their class masks). Rows, all in this process: `fscs predict` as the
command runs it on the 1-way 1-shot episode (checkpoint and backbone loaded every call, files written), the
page's first request (the load included) and warm requests (`fscs.demo.handlers.answer`: 1-way 1-shot,
1-way 5-shot and 2-way 1-shot, those the workspace has).
Threads: torch's default (every core). Peak RSS is the process's, after each row.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

from fscs.cli import main as cli_main
from fscs.demo.handlers import ClassInput, Models, SupportInput, answer
from fscs.demo.workspace import find_checkpoints, test_episodes


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--checkpoint", default=None, help="default: the first one the page lists")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    checkpoints = find_checkpoints(args.workspace)
    if args.checkpoint:
        checkpoints = [c for c in checkpoints if c.path.resolve() == Path(args.checkpoint).resolve()]
    if not checkpoints:
        raise SystemExit(f"no checkpoint in {args.workspace}/models/cst: run `make run` first")
    ckpt = checkpoints[0]
    episodes = {
        (way, shot): ep
        for way, shot in ((1, 1), (1, 5), (2, 1))
        if (ep := next(test_episodes(args.workspace, ckpt.fold, way, shot), None)) is not None
    }
    if (1, 1) not in episodes:
        raise SystemExit(f"the workspace has no 1-way 1-shot test episode of fold {ckpt.fold}")
    requests = {
        f"{way}-way {shot}-shot": (
            [
                ClassInput(c, False, [SupportInput(i, m) for i, m in shots])
                for c, shots in zip(ep.classes, ep.supports, strict=True)
            ],
            ep.query,
        )
        for (way, shot), ep in episodes.items()
    }
    e = episodes[(1, 1)]
    ((support, mask),) = e.supports[0]
    one, query = requests["1-way 1-shot"]

    def predict_cli() -> None:
        with tempfile.TemporaryDirectory() as out:
            argv = ["predict", "--checkpoint", str(ckpt.path), "--out", out, "--query", query]
            cli_main([*argv, "--support", f"{support}:{e.classes[0]}:{mask}"])

    rows = []
    seconds = timed(predict_cli, args.repeat)
    rows.append(("fscs predict (loads the model every call)", seconds, peak_rss_mb()))
    models = Models()
    seconds = timed(lambda: answer(models, ckpt.path, one, query), 1)
    rows.append(("page, first request (model load included)", seconds, peak_rss_mb()))
    for name, (classes, q) in requests.items():
        reply = answer(models, ckpt.path, classes, q)
        assert reply.error is None, reply.error
        seconds = timed(lambda classes=classes, q=q: answer(models, ckpt.path, classes, q), args.repeat)
        rows.append((f"page, warm request, {name}", seconds, peak_rss_mb()))
    base = statistics.median(rows[0][1])
    print(f"{ckpt.label}; the fold's first test episode of each type; median of {args.repeat} (first: one)")
    print(f"{'request':48s} {'median s':>9s} {'min s':>7s} {'ratio':>7s} {'peak RSS MB':>12s}")
    for name, secs, rss in rows:
        med = statistics.median(secs)
        print(f"{name:48s} {med:9.3f} {min(secs):7.3f} {base / med:6.2f}x {rss:12.0f}")


if __name__ == "__main__":
    main()
