"""Stage `get_data`: fill the dataset folder (dataset.root, data/raw/<name>) from a local copy or a download.

    python -m stages.get_data --dest data/raw/msrc

A copy already on this machine is linked, never copied or written to: the folder in FSCS_<NAME>_SOURCE,
else `shared/data/<folder>` in a folder above the working directory (also found from DVC's temporary
experiment copies under .dvc/tmp/exps). Without one, the official archive is downloaded,
checked against its checksum and converted to the VOC layout (`fscs.data.get`). With neither, the stage
stops with one line saying how to get the data.
"""

from __future__ import annotations

import argparse
import os

from fscs.core.errors import FscsError
from fscs.data import get
from stages._common import run_stage, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--dest", required=True, help="dataset folder to fill (data/raw/<name>)")
    args = parser.parse_args(argv)
    dest = os.path.normpath(args.dest)
    root, name = os.path.split(dest)
    source = get.local_copy(name)
    request = argparse.Namespace(name=name, source=source, root=root, url=None, keep_archives=False)
    try:
        get.run(request)
    except FscsError as exc:
        if source is not None:
            raise
        raise FscsError(
            f"no local copy of {name} and no download: {exc} -- set {get.source_variable(name)}=DIR to a "
            f"copy in VOC layout (or `fscs data get {name} --from DIR`), or rerun with internet access"
        ) from exc


if __name__ == "__main__":
    run_stage(main)
