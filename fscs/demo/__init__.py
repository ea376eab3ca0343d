"""`fscs demo`: a local page to try a trained checkpoint: supports and a query in, presence and masks out.

    fscs demo [--workspace .] [--host 127.0.0.1] [--port 7860] [--params params.yaml] [--share]

The page lists the checkpoints the pipeline wrote (``models/cst/<setting>/fold<f>.pt``) with the classes each
fold was trained on, takes 1 or 2 classes of 1-5 support images each (with an optional mask: an uploaded PNG
or a brush on the image; a class can be a stuff class) and one query, and shows per class the presence
probability and decision, the query overlay in the VOC palette with a legend, the mask every support was
taught with, and the time taken. It runs `fscs.predict.episode.predict_episode`, the code of `fscs predict`;
the model and backbone load once per process. Nothing leaves the machine (no analytics, no fonts or scripts
from a CDN) and nothing in the workspace is written. Gradio is imported only by this command.
"""

from __future__ import annotations

import argparse

#: Largest upload the page accepts (Gradio refuses bigger files before they reach fscs).
MAX_UPLOAD = "20mb"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", default=".", help="project folder with models/ and data/ (default: .)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument(
        "--params",
        default=None,
        help="params file whose pseudo section makes support pseudo-masks (as `fscs predict --params`)",
    )
    parser.add_argument(
        "--share", action="store_true", help="also open a public gradio.live link (off: local only)"
    )


def run(args: argparse.Namespace) -> None:
    from fscs.demo.app import serve

    serve(args.workspace, args.host, args.port, args.params, share=args.share)
