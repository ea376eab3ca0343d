"""`fscs demo`: the handlers on a tiny trained workspace (fast), and the page in a real headless Chromium
(Playwright driving Debian's chromium): upload, run, the probability shown, the overlay pixel-equal to what
`fscs predict` writes, every request to 127.0.0.1, and nothing written into the workspace."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import build_voc
from PIL import Image
from test_refusals import build, stage, stage_argv, tiny_params

from fscs.cli import main as cli_main
from fscs.data.images import PIXEL_LIMIT_ENV
from fscs.demo.handlers import ClassInput, Models, SupportInput, answer, brush_mask
from fscs.demo.workspace import find_checkpoints, find_examples

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    """A workspace laid out as the pipeline leaves it: params.yaml, data/index, data/episodes, one pixel
    checkpoint of fold 0 (tiny random ViT); plus a support with its binary class mask and a query."""
    root = tmp_path_factory.mktemp("demo") / "ws"
    build_voc(root / "voc", per_class=4)
    params = tiny_params(root / "voc")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root.parent / "build").mkdir()
    a = build(root.parent / "build", params)  # prepare and extract
    (root / "data" / "index").mkdir(parents=True)
    shutil.copy(a.index, root / "data" / "index" / "tiny.parquet")
    shutil.copytree(a.episodes, root / "data" / "episodes" / "tiny")
    stage("train").main(stage_argv("train", a, root.parent / "train", a.params))
    ckpt = root / "models" / "cst" / "pixel" / "fold0.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(root.parent / "train" / "model.pt", ckpt)
    support, query = root / "voc" / "JPEGImages" / "val_1_0.jpg", root / "voc" / "JPEGImages" / "val_1_1.jpg"
    gt = np.asarray(Image.open(root / "voc" / "SegmentationClass" / "val_1_0.png"))
    mask = root.parent / "cat_mask.png"
    Image.fromarray((gt == 1).astype(np.uint8) * 255).save(mask)
    return SimpleNamespace(root=root, ckpt=ckpt, support=support, query=query, mask=mask, build=a)


def predicted(ws, out: Path, *support: str) -> dict:
    """`fscs predict` on the fixture's support (with its mask) and query: its query document."""
    spec = support or (f"{ws.support}:cat:{ws.mask}",)
    argv = ["predict", "--checkpoint", str(ws.ckpt), "--out", str(out), "--query", str(ws.query)]
    cli_main([*argv, *(a for s in spec for a in ("--support", s))])
    return json.loads((out / "predictions.json").read_text())["queries"][0]


def one_class(ws, **support) -> list[ClassInput]:
    return [ClassInput("cat", False, [SupportInput(**({"image": str(ws.support)} | support))])]


# ---- the workspace: checkpoints with their training classes, examples from the test episodes --------------
def test_checkpoints_listed_with_the_classes_they_trained_on(ws):
    (info,) = find_checkpoints(ws.root)
    assert (info.supervision, info.fold, info.path) == ("pixel", 0, ws.ckpt)
    assert info.trained_on == ["tree", "car", "boat"]  # fold 0 tests cat, dog, sky: novel to it
    assert info.label == "pixel fold 0 (trained on: tree, car, boat)"


def test_examples_are_test_episodes_of_novel_classes_with_binary_masks(ws):
    examples = find_examples(ws.root, find_checkpoints(ws.root))
    assert examples and len({e.cls for e in examples}) == len(examples)
    for e in examples:
        assert e.cls in ("cat", "dog", "sky") and Path(e.support).is_file() and Path(e.query).is_file()
        assert not Path(e.mask).is_relative_to(ws.root)  # written outside the workspace
        values = np.unique(np.asarray(Image.open(e.mask)))
        assert set(values.tolist()) <= {0, 255} and 255 in values


def test_no_checkpoints_means_no_examples(tmp_path):
    assert find_checkpoints(tmp_path) == [] and find_examples(tmp_path, []) == []


# ---- the handler: the same numbers and pixels as `fscs predict` -------------------------------------------
def test_answer_equals_fscs_predict(ws, tmp_path):
    doc = predicted(ws, tmp_path / "pred")
    reply = answer(Models(), ws.ckpt, one_class(ws, mask=str(ws.mask)), str(ws.query))
    assert reply.error is None, reply.error
    written = np.asarray(Image.open(tmp_path / "pred" / doc["overlay"]).convert("RGB"))
    np.testing.assert_array_equal(reply.overlay, written)
    assert f"| cat | {doc['classes'][0]['probability']:.3f} |" in reply.summary
    assert ("**present**" in reply.summary) == doc["classes"][0]["present"]
    assert reply.supports[0][1] == f"cat: mask {ws.mask.name}" and "cat" in reply.legend
    assert reply.seconds is not None and "Answered in" in reply.summary


def test_pseudo_and_stuff_supports_as_fscs_predict(ws, tmp_path):
    doc = predicted(ws, tmp_path / "pred", f"{ws.support}:cat")
    reply = answer(Models(), ws.ckpt, one_class(ws), str(ws.query))
    written = np.asarray(Image.open(tmp_path / "pred" / doc["overlay"]).convert("RGB"))
    np.testing.assert_array_equal(reply.overlay, written)
    assert reply.supports[0][1] == "cat: pseudo"
    stuff = [ClassInput("cat", True, [SupportInput(str(ws.support))])]
    assert (
        answer(Models(), ws.ckpt, stuff, str(ws.query)).supports[0][1] == "cat: pseudo, complemented (stuff)"
    )


def test_model_loads_once_per_process(ws):
    models = Models()
    assert models.get(ws.ckpt) is models.get(str(ws.ckpt))


def test_painted_mask_is_used_and_scaled_to_the_image(ws, tmp_path):
    gt = np.asarray(Image.open(ws.mask)) > 0  # 24x32, painted on a canvas twice as large
    strokes = np.zeros((*np.repeat(np.repeat(gt, 2, 0), 2, 1).shape, 4), np.uint8)
    strokes[np.repeat(np.repeat(gt, 2, 0), 2, 1), 3] = 255
    brush = brush_mask({"background": None, "layers": [strokes], "composite": None})
    reply = answer(Models(), ws.ckpt, one_class(ws, brush=brush), str(ws.query))
    assert reply.error is None and reply.supports[0][1] == "cat: painted"
    assert any("painted mask (64x48) was scaled to the image (32x24)" in n for n in reply.notes), reply.notes
    given = answer(Models(), ws.ckpt, one_class(ws, mask=str(ws.mask)), str(ws.query))
    np.testing.assert_array_equal(reply.overlay, given.overlay)  # the same mask, the same answer
    assert brush_mask({"layers": [np.zeros((4, 4, 4), np.uint8)]}) is None  # nothing painted


# ---- bad input: a message, never an exception ---------------------------------------------------------
def test_bad_inputs_are_messages(ws, tmp_path, monkeypatch):
    models = Models()
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    wrong_size = tmp_path / "small.png"
    Image.fromarray(np.full((5, 7), 255, np.uint8)).save(wrong_size)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(empty)
    q = str(ws.query)
    cases = {
        "not an image": (one_class(ws, image=str(not_image)), q, str(not_image)),
        "mask size": (one_class(ws, mask=str(wrong_size)), q, "mask is 7x5 but its image is 32x24"),
        "empty mask": (one_class(ws, mask=str(empty)), q, "the mask PNG has no foreground pixels"),
        "no support": ([ClassInput("cat", False, [SupportInput()])], q, "class 'cat' has no support image"),
        "no name": (
            [ClassInput("", False, [SupportInput(str(ws.support))])],
            q,
            "class 1 has support images",
        ),
        "no class": ([ClassInput()], q, "add a class"),
        "same names": (one_class(ws) * 2, q, "two classes are both named 'cat'"),
        "no query": (one_class(ws), None, "upload a query image"),
    }
    for name, (classes, query, message) in cases.items():
        reply = answer(models, ws.ckpt, classes, query)
        assert reply.error and message in reply.error, (name, reply.error)
        assert reply.overlay is None
    assert answer(models, None, one_class(ws), q).error == "choose a checkpoint"
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "100")  # the limit `fscs predict` enforces: 24x32 > 2 x 100
    reply = answer(models, ws.ckpt, one_class(ws), q)
    assert "decompression-bomb limit" in reply.error and PIXEL_LIMIT_ENV in reply.error


def test_checkpoint_from_another_backbone_is_a_message(ws, tmp_path):
    import torch

    from fscs.features.backbone import create_backbone
    from fscs.learn.model.cst import backbone_attrs

    forged = torch.load(ws.ckpt, weights_only=True)
    forged["config"]["backbone"] = backbone_attrs(create_backbone("vit_tiny_random", 48).store_attrs("all"))
    path = tmp_path / "forged.pt"
    torch.save(forged, path)
    reply = answer(Models(), path, one_class(ws), str(ws.query))
    assert reply.error.startswith(f"{path}: its CST weights expect grid=(4, 4)"), reply.error


# ---- the page in a real browser --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.md5(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def server(ws, tmp_path_factory):
    """`fscs demo` on a free port of 127.0.0.1, serving the tiny workspace."""
    pytest.importorskip("gradio")
    port = free_port()
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(log.parent / "gradio")}
    cmd = [sys.executable, "-m", "fscs.cli", "demo", "--workspace", str(ws.root), "--port", str(port)]
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ws.root, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
    yield SimpleNamespace(url=url, proc=proc, log=log)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    args += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield b
        b.close()


def run_on_page(page, ws, query: Path | None, expect: str) -> str:
    """Fill class 1 with the fixture's support and mask (and the query), press Run, wait for ``expect`` in
    the message (and the progress timer gone), return the message."""
    page.locator("#class0-name textarea, #class0-name input").first.fill("cat")
    page.locator("#c0s0-image input[type=file]").set_input_files(str(ws.support))
    page.locator("#c0s0-mask input[type=file]").set_input_files(str(ws.mask))
    if query is not None:
        page.locator("#query input[type=file]").set_input_files(str(query))
    page.wait_for_timeout(1500)  # the uploads reach the server
    page.locator("#run").click()
    done = """e => { const t = document.querySelector('#message').innerText;
        return t.includes(e) && !/^\\s*\\d+(\\.\\d+)?s/.test(t); }"""
    page.wait_for_function(done, arg=expect, timeout=120_000)
    return page.locator("#message").inner_text()


@pytest.mark.slow
def test_page_in_a_browser_matches_fscs_predict_offline(ws, server, browser, tmp_path):
    doc = predicted(ws, tmp_path / "pred")
    before = tree_state(ws.root)
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url, wait_until="networkidle")
    assert page.locator("#checkpoint input").input_value() == "pixel fold 0 (trained on: tree, car, boat)"

    run_on_page(page, ws, None, "error: upload a query image")  # a message, and the server stays up
    message = run_on_page(page, ws, ws.query, "presence probability")
    probability = doc["classes"][0]["probability"]
    assert f"{probability:.3f}" in message and ("present" in message) == doc["classes"][0]["present"]

    src = page.locator("#overlay img").first.get_attribute("src")
    shown = page.request.get(src).body()
    (tmp_path / "shown.png").write_bytes(shown)
    written = np.asarray(Image.open(tmp_path / "pred" / doc["overlay"]).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "shown.png").convert("RGB")), written)
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    hosts = {r.split("/")[2] for r in requests}
    assert hosts == {server.url.split("/")[2]}, sorted(hosts)  # every request to 127.0.0.1, none elsewhere
    assert tree_state(ws.root) == before  # nothing in the workspace written or changed
    assert server.proc.poll() is None and "Traceback" not in server.log.read_text()
    page.close()


@pytest.mark.slow
def test_upload_over_the_stated_limit_is_refused(server, ws):
    """The page states its byte limit (fscs.demo.MAX_UPLOAD); the server refuses a larger upload (413)."""
    import httpx

    from fscs.demo import MAX_UPLOAD

    big = bytes(int(MAX_UPLOAD.removesuffix("mb")) * 1_100_000)  # over the limit in MB and in MiB
    reply = httpx.post(server.url + "gradio_api/upload", files={"files": ("big.png", big)}, timeout=60)
    assert reply.status_code == 413, (reply.status_code, reply.text[:300])
    small = httpx.post(server.url + "gradio_api/upload", files={"files": ("a.jpg", ws.support.read_bytes())})
    assert small.status_code == 200 and server.proc.poll() is None


@pytest.mark.slow
def test_page_without_checkpoints_says_how_to_make_them(browser, tmp_path):
    pytest.importorskip("gradio")
    from fscs.demo.app import build

    page_app = build(tmp_path)
    _, url, _ = page_app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True)
    try:
        page = browser.new_page()
        page.goto(url, wait_until="networkidle")
        text = page.locator("#message").inner_text()
        assert "No trained checkpoints" in text and "make run" in text
        page.close()
    finally:
        page_app.close()
