"""What every stage shares: the --params argument and turning FscsError into a clean non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from fscs.core.errors import FscsError
from fscs.core.io import has_abandoned, is_no_space, no_space_error


def stage_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the common --params option."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return parser


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's main; on FscsError print 'error: ...' to stderr and exit with status 2. A full disk met
    outside `fscs.core.io.atomic_path` (which names its output) is the same one line, naming the file if
    known."""
    try:
        main(argv)
    except FscsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (OSError, RuntimeError) as exc:
        if not is_no_space(exc):
            raise
        print(f"error: {no_space_error(getattr(exc, 'filename', None) or Path.cwd())}", file=sys.stderr)
        sys.exit(2)
    finally:
        if has_abandoned():  # an HDF5 file that failed to write: closing it at exit would crash the process
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
