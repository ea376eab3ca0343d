"""The `fscs` command: data download/placement and prediction for users (stages run through DVC)."""

from __future__ import annotations

import argparse
import importlib
import sys

from fscs.core.errors import FscsError

# subcommand -> module exposing add_arguments(parser) and run(args)
COMMANDS = {
    "data": ("fscs.data.get", "get a dataset into data/raw/NAME (local folder or official URLs)"),
    "params": (
        "fscs.config.overrides",
        "params.yaml with a settings file's overrides merged on top (configs/)",
    ),
    "predict": ("fscs.predict.cli", "few-shot classify and segment query images from support images"),
    "kernel": ("fscs.learn.model.fused_attention", "build the fused CPU attention kernel and check it"),
    "demo": ("fscs.demo", "serve a local page to try a trained checkpoint on your own images"),
}


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand, hand over to its module, turn FscsError into exit status 2."""
    parser = argparse.ArgumentParser(prog="fscs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        modules[args.command].run(args)
    except FscsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
