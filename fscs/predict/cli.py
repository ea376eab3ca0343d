"""`fscs predict`: its command-line arguments and `run`, which parses them, predicts one episode from the
files named (`fscs.predict.files.predict_files`) and writes the results (`fscs.predict.outputs`)."""

from __future__ import annotations

import argparse

#: The help text after the arguments: what the command does and writes.
EPILOG = """\
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

Presence: by default a class is present where the checkpoint's presence threshold (fitted on its training
dataset's validation episodes) says so. On images from another domain that threshold can be far off (too
strict or too lenient); ``--reference IMG`` (repeat; 8 or more) gives unlabelled images of the queries'
domain, most of them not showing the classes (a random sample of the collection), and a class is then present
where the query scores above those references by their spread (`fscs.predict.reference`); the JSON's
probability is then that relative score's sigmoid.

The checkpoint's config names the backbone (and its weights' sha256, precision): that backbone is built and
must match. It and the CST model run on ``FSCS_DEVICE`` (`fscs.core.device`).
Writes per query ``<name>.json`` (class names, presence probabilities, present flags, mask pixel counts),
``<name>_mask.png`` (index PNG at the query's original size: 0 background, i = class i, VOC palette) and
``<name>_overlay.png``, per support ``support<i>_<name>_overlay.png`` (the mask the class was taught with,
given or pseudo, so a user sees what each class was taught), plus ``predictions.json`` listing every query
and support. All inputs are read and checked before anything is written.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
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
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="IMG",
        help="an unlabelled image of the queries' domain (repeat, 8 or more): decide presence relative to "
        "them instead of the checkpoint's threshold",
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


def run(args: argparse.Namespace) -> None:
    """Parse and read everything (errors before any output), predict the episode, write its files."""
    from pathlib import Path

    from fscs.predict.files import predict_files
    from fscs.predict.inputs import parse_support, read_config
    from fscs.predict.outputs import summary_line, write_predictions

    specs = [parse_support(s) for s in args.support]
    config = read_config(args.params)
    prediction = predict_files(
        args.checkpoint, specs, args.query, config, args.stuff, alpha=args.alpha, references=args.reference
    )
    out = Path(args.out)
    summary = write_predictions(out, args.checkpoint, specs, args.query, prediction)
    print(summary_line(summary, len(prediction.result.classes), out))
