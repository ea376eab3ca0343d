"""What every stage shares: the --params argument and turning FscsError into a clean non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fscs.errors import FscsError


def stage_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the common --params option."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return parser


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's main; on FscsError print 'error: ...' to stderr and exit with status 2."""
    try:
        main(argv)
    except FscsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
