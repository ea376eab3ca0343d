"""`fscs data get NAME [--from DIR] [--root data/raw]`: put a dataset where the pipeline reads it.

With `--from DIR`, the dataset already on disk is checked for its layout and `ROOT/NAME` becomes a
symbolic link to it (absolute target): nothing is copied, and a read-only source is never written to
(COCO masks rendered by `prepare` go to `data/raw/masks_rendered/`, not into the dataset).

Without `--from`, the official archives of `voc2012`, `sbd` or `coco2014` are downloaded into
`ROOT/.downloads/` (to `<file>.partial` first, resumed with an HTTP range request when the server allows,
renamed when complete), checked against their published checksum (an error names the file and deletes
it), extracted into a temporary folder beside the destination and moved into `ROOT/NAME` only when the
layout checks out. Archives are deleted after a successful placement unless `--keep-archives`.
The base URL can be replaced by a mirror: `--url BASE` or the environment variable FSCS_MIRROR; the
archive's file name is appended to it.

Placed layouts:
- `voc2012`: the `VOCdevkit/VOC2012` folder (JPEGImages, SegmentationClass, ImageSets/...).
- `sbd`: `SegmentationClassAug/` (the SBD-augmented masks for all 12031 train_aug + val images) and
  `ImageSets/Segmentation/train_aug.txt` (every SegmentationClassAug id not in VOC2012 val: 10582 ids) and
  `val.txt` (VOC2012's). Needs `voc2012` placed first. For Pascal-5i set `dataset.root: data/raw/voc2012`,
  `mask_dir: ../sbd/SegmentationClassAug`, `split_dir: ../sbd/ImageSets/Segmentation`,
  `train_split: train_aug`, `test_split: val`.
- `coco2014`: `train2014/`, `val2014/`, `annotations/instances_{train,val}2014.json` (layout coco_json).
- `msrc`: the official MSRC-v2 zip converted to the VOC layout (`fscs.data.msrc`).
Other names work with `--from` only and are checked as the VOC layout.

`local_copy(NAME)` finds a copy already on this machine for the `get_data` stage: the folder in the
environment variable FSCS_<NAME>_SOURCE, else `shared/data/<folder>` in a folder above the working directory
(a data folder kept beside the repository, found from it and from DVC's temporary experiment copies in it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fscs.core.errors import FscsError
from fscs.data import msrc


@dataclass(frozen=True)
class Remote:
    """One archive: official URL, and its checksum where one is published (None: not verified)."""

    filename: str
    url: str
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Source:
    files: tuple[Remote, ...]
    inner: str  # folder inside the extracted tree that becomes ROOT/NAME ("" = the whole tree)
    layout: str  # voc | sbd | coco_json
    convert: Callable[[str, str], object] | None = None  # (extracted inner folder, new folder) -> VOC layout


DATASETS: dict[str, Source] = {
    "voc2012": Source(
        files=(
            Remote(
                "VOCtrainval_11-May-2012.tar",
                "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                md5="6cd6e144f989b92b3379bac3b3de84fd",
            ),
        ),
        inner="VOCdevkit/VOC2012",
        layout="voc",
    ),
    "sbd": Source(
        # The SBD masks converted to VOC index PNGs (DrSleep's tensorflow-deeplab-resnet), the copy used by
        # few-shot segmentation work; no checksum is published for it.
        files=(
            Remote(
                "SegmentationClassAug.zip",
                "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
            ),
        ),
        inner="SegmentationClassAug",
        layout="sbd",
    ),
    "coco2014": Source(
        files=(
            Remote(
                "train2014.zip",
                "http://images.cocodataset.org/zips/train2014.zip",
                md5="0da8c0bd3d6becc4dcb32757491aca88",
            ),
            Remote(
                "val2014.zip",
                "http://images.cocodataset.org/zips/val2014.zip",
                md5="a3d79f5ed8d289b7a7554ce06a5782b3",
            ),
            Remote(
                "annotations_trainval2014.zip",
                "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                md5="0a379cfc70b0e71301e0f377548639bd",
            ),
        ),
        inner="",
        layout="coco_json",
    ),
    "msrc": Source(
        # Microsoft publishes no checksum; this md5 is the one public dataset loaders list for the archive.
        files=(
            Remote(
                "msrc_objcategimagedatabase_v2.zip",
                "http://download.microsoft.com/download/3/3/9/339D8A24-47D7-412F-A1E8-1A415BC48A15/"
                "msrc_objcategimagedatabase_v2.zip",
                md5="8fcd292c7f1e69f91a2ef513746bd52c",
            ),
        ),
        inner="MSRC_ObjCategImageDatabase_v2",
        layout="voc",
        convert=msrc.to_voc,
    ),
}
# folder name of a prepared copy under shared/data/
SHARED_FOLDER = {"msrc": "msrc-v2"}
LAYOUT_OF_NAME = {"msrc": "voc", "voc2012": "voc", "sbd": "sbd", "coco2014": "coco_json"}
CHUNK = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help=f"dataset name ({', '.join(DATASETS)} download; any name with --from)")
    parser.add_argument(
        "--from", dest="source", metavar="DIR", help="use the dataset already in DIR (symlink)"
    )
    parser.add_argument("--root", default=os.path.join("data", "raw"), help="where datasets live (data/raw)")
    parser.add_argument("--url", help="mirror base URL replacing the official one (or env FSCS_MIRROR)")
    parser.add_argument("--keep-archives", action="store_true", help="keep downloaded archives")


def run(args: argparse.Namespace) -> None:
    name = args.name
    if not name or "/" in name or name.startswith("."):
        raise FscsError(f"bad dataset name {name!r}")
    root = args.root
    dest = os.path.join(root, name)
    layout = LAYOUT_OF_NAME.get(name, "voc")
    if args.source:
        place_from(name, args.source, root, layout)
        return
    if name not in DATASETS:
        raise FscsError(f"no download known for {name!r} (known: {', '.join(DATASETS)}); use --from DIR")
    if os.path.lexists(dest):
        problem = layout_problem(dest, layout)
        if problem is None:
            print(f"data get: {dest} already present; nothing to do")
            return
        raise FscsError(f"{dest} exists but is not a valid {name} folder ({problem}); remove it and retry")
    source = DATASETS[name]
    val_ids = _voc_val_ids(root) if layout == "sbd" else None
    mirror = args.url or os.environ.get("FSCS_MIRROR")
    downloads = os.path.join(root, ".downloads")
    archives = [download(remote, downloads, mirror) for remote in source.files]
    work = os.path.join(root, f".{name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        extract_dir = os.path.join(work, "extract")
        for archive in archives:
            extract(archive, extract_dir)
        inner = os.path.join(extract_dir, source.inner) if source.inner else extract_dir
        if not os.path.isdir(inner):
            raise FscsError(f"{', '.join(archives)}: archive does not contain the folder '{source.inner}'")
        if layout == "sbd":
            staged = os.path.join(work, "placed")
            os.makedirs(staged)
            os.replace(inner, os.path.join(staged, "SegmentationClassAug"))
            _write_sbd_lists(staged, val_ids)
        elif source.convert is not None:
            staged = os.path.join(work, "placed")
            source.convert(inner, staged)
        else:
            staged = inner
        problem = layout_problem(staged, layout)
        if problem is not None:
            raise FscsError(
                f"{', '.join(archives)}: extracted files are not a valid {name} folder ({problem})"
            )
        os.replace(staged, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.keep_archives:
        for archive in archives:
            os.remove(archive)
    print(f"data get: {name} placed in {dest}")


def source_variable(name: str) -> str:
    """The environment variable naming a local copy of dataset `name` (FSCS_MSRC_SOURCE for msrc)."""
    return f"FSCS_{name.upper().replace('-', '_')}_SOURCE"


def local_copy(name: str, start: str | os.PathLike = ".") -> str | None:
    """A copy of `name` on this machine: $FSCS_<NAME>_SOURCE, else shared/data/<folder> above `start`."""
    given = os.environ.get(source_variable(name))
    if given:
        return given
    folder = SHARED_FOLDER.get(name, name)
    for parent in Path(start).resolve().parents:
        candidate = parent / "shared" / "data" / folder
        if candidate.is_dir():
            return str(candidate)
    return None


def place_from(name: str, source: str, root: str, layout: str) -> None:
    """Link ROOT/NAME to an existing dataset folder after checking its layout."""
    if not os.path.isdir(source):
        raise FscsError(f"{source}: folder not found")
    src = os.path.abspath(source)
    dest = os.path.join(root, name)
    if layout == "voc":
        for candidate in (src, os.path.join(src, "VOC2012"), os.path.join(src, "VOCdevkit", "VOC2012")):
            if layout_problem(candidate, "voc") is None:
                src = candidate
                break
    if layout == "sbd" and os.path.isdir(os.path.join(src, "SegmentationClassAug")):
        src = os.path.join(src, "SegmentationClassAug")
    check = "sbd_masks" if layout == "sbd" else layout
    problem = layout_problem(src, check)
    if problem is not None:
        raise FscsError(f"{source}: not a valid {name} folder ({problem})")
    if os.path.lexists(dest):
        if os.path.islink(dest) and os.path.realpath(dest) == os.path.realpath(src) and layout != "sbd":
            print(f"data get: {dest} already links to {src}; nothing to do")
            return
        raise FscsError(f"{dest} already exists; remove it to place {source} there")
    os.makedirs(root, exist_ok=True)
    if layout == "sbd":
        val_ids = _voc_val_ids(root)
        work = os.path.join(root, f".{name}.partial")
        shutil.rmtree(work, ignore_errors=True)
        try:
            os.makedirs(work)
            os.symlink(src, os.path.join(work, "SegmentationClassAug"), target_is_directory=True)
            _write_sbd_lists(work, val_ids)
            os.replace(work, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:
        tmp = os.path.join(root, f".{name}.link.partial")
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(src, tmp, target_is_directory=True)
        os.replace(tmp, dest)
    print(f"data get: {dest} -> {src}")


def layout_problem(folder: str, layout: str) -> str | None:
    """What is missing for `folder` to have `layout`, or None when it looks right."""
    if not os.path.isdir(folder):
        return "folder not found"
    if layout == "voc":
        need = ["JPEGImages", os.path.join("ImageSets", "Segmentation")]
        missing = [d for d in need if not os.path.isdir(os.path.join(folder, d))]
        if missing:
            return f"no {missing[0]}/ folder"
        if not any(
            os.path.isdir(os.path.join(folder, d)) for d in ("SegmentationClass", "SegmentationClassAug")
        ):
            return "no SegmentationClass/ or SegmentationClassAug/ folder"
        return None
    if layout == "sbd_masks":
        if not any(f.endswith(".png") for f in os.listdir(folder)):
            return "no PNG masks"
        return None
    if layout == "sbd":
        problem = layout_problem(os.path.join(folder, "SegmentationClassAug"), "sbd_masks")
        if problem:
            return f"SegmentationClassAug/: {problem}"
        lists = os.path.join(folder, "ImageSets", "Segmentation")
        for split in ("train_aug", "val"):
            if not os.path.isfile(os.path.join(lists, f"{split}.txt")):
                return f"no ImageSets/Segmentation/{split}.txt"
        return None
    if layout == "coco_json":
        for part in ("train2014", "val2014"):
            if not os.path.isdir(os.path.join(folder, part)):
                return f"no {part}/ folder"
            if not os.path.isfile(os.path.join(folder, "annotations", f"instances_{part}.json")):
                return f"no annotations/instances_{part}.json"
        return None
    raise ValueError(layout)


def _voc_val_ids(root: str) -> list[str]:
    path = os.path.join(root, "voc2012", "ImageSets", "Segmentation", "val.txt")
    if not os.path.isfile(path):
        raise FscsError(
            f"{path} not found: place voc2012 first (`fscs data get voc2012`); the sbd train_aug list is "
            "every SegmentationClassAug image not in VOC2012 val"
        )
    return [line.split()[0] for line in open(path).read().splitlines() if line.strip()]


def _write_sbd_lists(folder: str, val_ids: list[str]) -> None:
    masks = os.path.join(folder, "SegmentationClassAug")
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(masks) if f.endswith(".png"))
    val = set(val_ids)
    lists = os.path.join(folder, "ImageSets", "Segmentation")
    os.makedirs(lists, exist_ok=True)
    with open(os.path.join(lists, "train_aug.txt"), "w") as f:
        f.writelines(f"{i}\n" for i in ids if i not in val)
    with open(os.path.join(lists, "val.txt"), "w") as f:
        f.writelines(f"{i}\n" for i in val_ids)


def file_digest(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str, remote: Remote, url: str) -> None:
    """Check a downloaded file's checksum; on mismatch delete it and raise, naming it."""
    for algorithm, want in (("sha256", remote.sha256), ("md5", remote.md5)):
        if want is None:
            continue
        got = file_digest(path, algorithm)
        if got != want.lower():
            os.remove(path)
            raise FscsError(
                f"{path}: {algorithm} {got} does not match the expected {want} (from {url}); the file was "
                "deleted, nothing was placed"
            )
        return
    print(f"data get: no published checksum for {remote.filename}; sha256 {file_digest(path, 'sha256')}")


def download(remote: Remote, folder: str, mirror: str | None = None) -> str:
    """Download (or reuse) one archive into `folder`, verified; returns its path."""
    url = f"{mirror.rstrip('/')}/{remote.filename}" if mirror else remote.url
    final = os.path.join(folder, remote.filename)
    if os.path.isfile(final):
        try:
            verify(final, remote, url)
            return final
        except FscsError:
            pass  # a bad earlier download: fetch it again
    os.makedirs(folder, exist_ok=True)
    partial = final + ".partial"
    have = os.path.getsize(partial) if os.path.isfile(partial) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "fscs-data-get"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            resumed = have > 0 and response.status == 206
            mode = "ab" if resumed else "wb"
            start = have if resumed else 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            with (
                open(partial, mode) as f,
                tqdm(
                    total=total, initial=start, unit="B", unit_scale=True, desc=remote.filename, disable=None
                ) as bar,
            ):
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # range not satisfiable: the partial file is already complete
            pass
        else:
            raise FscsError(
                f"{url}: download of {remote.filename} failed (HTTP {exc.code} {exc.reason})"
            ) from exc
    except (urllib.error.URLError, OSError) as exc:
        resume = "; rerun to resume" if os.path.isfile(partial) else ""
        raise FscsError(f"{url}: download of {remote.filename} failed ({exc}){resume}") from exc
    os.replace(partial, final)
    verify(final, remote, url)
    return final


def extract(archive: str, folder: str) -> None:
    """Extract a .tar(.gz) or .zip archive into `folder` (no paths outside it; macOS metadata skipped)."""
    os.makedirs(folder, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                members = [m for m in z.namelist() if not m.startswith("__MACOSX/")]
                for member in tqdm(members, desc=f"extract {os.path.basename(archive)}", disable=None):
                    z.extract(member, folder)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                t.extractall(folder, filter="data")
        else:
            raise FscsError(f"{archive}: neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise FscsError(f"{archive}: archive is damaged ({exc})") from exc
