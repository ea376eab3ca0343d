"""`fscs data get`: --from placement and downloads from a local 127.0.0.1 HTTP server (mirror URL)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import http.server
import io
import os
import tarfile
import threading
import zipfile

import pytest

from fscs.core.errors import FscsError
from fscs.data import get


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range support (for the resume test) and no request logging."""

    ranges: list[str] = []

    def log_message(self, *args):
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not os.path.isfile(path):
            return super().send_head()
        RangeHandler.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0])
        data = open(path, "rb").read()
        self.send_response(206)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        return io.BytesIO(data[start:])


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(RangeHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def parse(*argv):
    parser = argparse.ArgumentParser()
    get.add_arguments(parser)
    return parser.parse_args(list(argv))


def voc_tar(path, ids=("2007_000032", "2007_000039")):
    with tarfile.open(path, "w") as t:
        for member, data in [
            *[(f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg", b"jpg") for i in ids],
            *[(f"VOCdevkit/VOC2012/SegmentationClass/{i}.png", b"png") for i in ids],
            ("VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt", f"{ids[0]}\n".encode()),
            ("VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt", f"{ids[1]}\n".encode()),
        ]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def with_md5(monkeypatch, name, md5):
    source = get.DATASETS[name]
    files = tuple(dataclasses.replace(f, md5=md5) for f in source.files)
    monkeypatch.setitem(get.DATASETS, name, dataclasses.replace(source, files=files))


def test_download_voc2012(server, tmp_path, monkeypatch):
    served, url = server
    md5 = voc_tar(served / "VOCtrainval_11-May-2012.tar")
    with_md5(monkeypatch, "voc2012", md5)
    root = tmp_path / "raw"
    get.run(parse("voc2012", "--root", str(root), "--url", url))
    assert sorted(os.listdir(root / "voc2012")) == ["ImageSets", "JPEGImages", "SegmentationClass"]
    assert (root / "voc2012/ImageSets/Segmentation/val.txt").read_text() == "2007_000039\n"
    assert sorted(os.listdir(root)) == [".downloads", "voc2012"]
    assert os.listdir(root / ".downloads") == []  # archive removed after placement
    get.run(parse("voc2012", "--root", str(root), "--url", url))  # already there: nothing to do


def test_download_checksum_mismatch(server, tmp_path, monkeypatch):
    served, url = server
    voc_tar(served / "VOCtrainval_11-May-2012.tar")  # the real md5 (6cd6e1...) cannot match
    monkeypatch.setenv("FSCS_MIRROR", url)
    root = tmp_path / "raw"
    with pytest.raises(FscsError, match=r"VOCtrainval_11-May-2012\.tar: md5 \w+ does not match.*6cd6e144"):
        get.run(parse("voc2012", "--root", str(root)))
    assert not os.path.lexists(root / "voc2012")
    assert sorted(os.listdir(root)) == [".downloads"] and os.listdir(root / ".downloads") == []


def test_download_resumes(server, tmp_path, monkeypatch):
    served, url = server
    archive = served / "VOCtrainval_11-May-2012.tar"
    with_md5(monkeypatch, "voc2012", voc_tar(archive))
    root = tmp_path / "raw"
    (root / ".downloads").mkdir(parents=True)
    data = archive.read_bytes()
    (root / ".downloads" / "VOCtrainval_11-May-2012.tar.partial").write_bytes(data[:1000])
    RangeHandler.ranges.clear()
    get.run(parse("voc2012", "--root", str(root), "--url", url, "--keep-archives"))
    assert RangeHandler.ranges == ["bytes=1000-"]
    assert (root / ".downloads" / "VOCtrainval_11-May-2012.tar").read_bytes() == data
    assert (root / "voc2012" / "JPEGImages" / "2007_000032.jpg").is_file()


def test_download_http_error(server, tmp_path):
    _, url = server
    with pytest.raises(FscsError, match=r"download of train2014\.zip failed \(HTTP 404"):
        get.run(parse("coco2014", "--root", str(tmp_path / "raw"), "--url", url))


def test_download_sbd(server, tmp_path, monkeypatch):
    served, url = server
    with_md5(monkeypatch, "voc2012", voc_tar(served / "VOCtrainval_11-May-2012.tar"))
    root = tmp_path / "raw"
    with pytest.raises(FscsError, match="place voc2012 first"):
        get.run(parse("sbd", "--root", str(root), "--url", url))
    get.run(parse("voc2012", "--root", str(root), "--url", url))
    with zipfile.ZipFile(served / "SegmentationClassAug.zip", "w") as z:
        for i in ("2007_000032", "2007_000039", "2008_000001"):
            z.writestr(f"SegmentationClassAug/{i}.png", b"png")
        z.writestr("__MACOSX/SegmentationClassAug/._2007_000032.png", b"junk")
    get.run(parse("sbd", "--root", str(root), "--url", url))
    lists = root / "sbd" / "ImageSets" / "Segmentation"
    assert (lists / "train_aug.txt").read_text() == "2007_000032\n2008_000001\n"
    assert (lists / "val.txt").read_text() == "2007_000039\n"
    assert len(os.listdir(root / "sbd" / "SegmentationClassAug")) == 3
    assert not (root / "sbd" / "__MACOSX").exists()


def test_place_from(voc_fixture, tmp_path):
    root = tmp_path / "raw"
    get.run(parse("msrc", "--from", str(voc_fixture.root), "--root", str(root)))
    assert os.path.islink(root / "msrc")
    assert os.readlink(root / "msrc") == str(voc_fixture.root.resolve())
    get.run(parse("msrc", "--from", str(voc_fixture.root), "--root", str(root)))  # same link: fine
    with pytest.raises(FscsError, match=r"raw/other already exists"):
        (root / "other").mkdir()
        get.run(parse("other", "--from", str(voc_fixture.root), "--root", str(root)))


def test_place_from_bad_layout(tmp_path):
    (tmp_path / "notvoc" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(
        FscsError, match=r"notvoc: not a valid msrc folder \(no ImageSets/Segmentation/ folder\)"
    ):
        get.run(parse("msrc", "--from", str(tmp_path / "notvoc"), "--root", str(tmp_path / "raw")))
    assert not (tmp_path / "raw" / "msrc").exists()
    with pytest.raises(FscsError, match="nowhere: folder not found"):
        get.run(parse("msrc", "--from", str(tmp_path / "nowhere"), "--root", str(tmp_path / "raw")))


def test_unknown_download(tmp_path):
    with pytest.raises(FscsError, match="no download known for 'ade20k'"):
        get.run(parse("ade20k", "--root", str(tmp_path)))
