"""The GPU path without stalls, checked on the CPU: the extraction writer thread (same store bytes, errors,
bounded queue), the training loop's deferred loss reads (same curve, the divergence names its step), the
stand-ins' matrix cache, the fused kernel's device refusal, the Dask GPU-worker rule, the Labeler's row
cache and enhancer device, and the GPU smoke's toy run."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import run_train, toy_dataset

import fscs.learn.train as train_module
from fscs.core import deterministic
from fscs.core.errors import FscsError
from fscs.data.images import load_rgb
from fscs.features import extraction
from fscs.features.backbone import create_backbone, preprocess
from fscs.features.extraction import _BackgroundWriter, extract_to_store
from fscs.features.store import FeatureStore, StoreWriter, iter_batches, partial_path

ROOT = Path(__file__).resolve().parent.parent
DATA = ("tokens", "cls_query", "patch_keys")


# ---- extraction: the writer thread ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(str(folder / f"{i}.jpg"))
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(paths[-1])
    return [f"im{i}" for i in range(5)], paths


def written_synchronously(bb, ids, paths, out, batch_size):
    """The store as the one-thread loop wrote it: extract, copy to the CPU, write, batch after batch."""
    writer = StoreWriter(out, ids, bb.store_attrs(), bb.store_shapes())
    try:
        for rows in iter_batches(len(ids), batch_size):
            x = torch.stack([preprocess(load_rgb(paths[r]), bb.input_size) for r in rows])
            f = bb.extract(x, "all", dtype=torch.float16).cpu()
            writer.write(rows, f.tokens.numpy(), f.cls_query.numpy(), f.patch_keys.numpy())
        return writer.finalize()
    finally:
        writer.close()


def test_writer_thread_store_is_byte_identical_to_a_synchronous_write(images, tmp_path):
    ids, paths = images
    bb = create_backbone("vit_tiny_random", 32)
    done = []
    stats = extract_to_store(
        bb, ids, paths, tmp_path / "a.h5", batch_size=2, progress=False, on_batch=done.append
    )
    ref = written_synchronously(bb, ids, paths, tmp_path / "b.h5", 2)
    assert done == [2, 4, 5]  # after each flushed batch, the rows written by then
    assert stats["computed"] == 5 and stats["writer_wait_seconds"] >= 0
    with FeatureStore(tmp_path / "a.h5") as a, FeatureStore(ref) as b:
        assert a.image_ids == b.image_ids
        for i in ids:
            for name in DATA:
                np.testing.assert_array_equal(getattr(a, name)(i), getattr(b, name)(i))
    assert (tmp_path / "a.h5").read_bytes() == ref.read_bytes()


def test_writer_error_surfaces_with_its_message_and_keeps_the_flushed_batches(images, tmp_path, monkeypatch):
    ids, paths = images
    bb = create_backbone("vit_tiny_random", 32)
    write = StoreWriter.write
    calls = []

    def failing(self, rows, *arrays):
        calls.append(rows)
        if len(calls) == 2:
            raise FscsError("the disk went away")
        write(self, rows, *arrays)

    monkeypatch.setattr(StoreWriter, "write", failing)
    out = tmp_path / "f.h5"
    with pytest.raises(FscsError, match="^the disk went away$"):
        extract_to_store(bb, ids, paths, out, batch_size=2, progress=False)
    assert calls[:2] == [[0, 1], [2, 3]] and not out.exists()
    monkeypatch.setattr(StoreWriter, "write", write)
    stats = extract_to_store(bb, ids, paths, out, batch_size=2, progress=False)
    assert stats["resumed_rows"] == 2 and stats["computed"] == 3  # only the flushed batch counted as done
    assert not partial_path(out).exists()


def test_on_batch_error_is_raised_in_the_caller(images, tmp_path):
    ids, paths = images

    def stop(done):
        raise KeyError(f"stopped at {done}")

    with pytest.raises(KeyError, match="stopped at 2"):
        bb = create_backbone("vit_tiny_random", 32)
        extract_to_store(bb, ids, paths, tmp_path / "f.h5", batch_size=2, progress=False, on_batch=stop)


class BlockingWriter:
    """A StoreWriter stand-in whose writes wait for `release`; records the rows it wrote, in order."""

    def __init__(self):
        self.release, self.started, self.rows = threading.Event(), threading.Event(), []

    def write(self, rows, *arrays):
        self.started.set()
        assert self.release.wait(10)
        self.rows.append(rows)


def test_the_queue_holds_at_most_two_batches_ahead_of_the_writer():
    writer = BlockingWriter()
    background = _BackgroundWriter(writer, lambda rows: None)
    arrays = (torch.zeros(1),)
    put = []
    feeder = threading.Thread(target=lambda: [put.append(background.put([i], arrays)) for i in range(4)])
    feeder.start()
    assert writer.started.wait(10)
    time.sleep(0.3)
    assert extraction.WRITE_AHEAD == 2
    assert len(put) == 3 and feeder.is_alive()  # one being written, two queued, the fourth waits
    writer.release.set()
    feeder.join(10)
    background.close()
    assert writer.rows == [[0], [1], [2], [3]] and background.waited > 0


def test_the_writer_waits_for_the_copy_event_before_it_reads_the_buffers():
    order = []

    class Event:
        def synchronize(self):
            order.append("synchronized")

    class Writer:
        def write(self, rows, *arrays):
            order.append(("write", rows))

    background = _BackgroundWriter(Writer(), lambda rows: order.append(("flushed", rows)))
    background.put([0, 1], (torch.zeros(2),), Event())
    background.close()
    assert order == ["synchronized", ("write", [0, 1]), ("flushed", [0, 1])]


# ---- training: loss read back every LOG_EVERY steps ------------------------------------------------------
def recorded_losses(monkeypatch, change=None):
    """Wrap the training loss: record each step's loss (``change(step, loss)`` may replace it)."""
    losses = []
    real = train_module.episode_loss

    def wrapped(*args, **kwargs):
        loss = real(*args, **kwargs)
        if change is not None:
            loss = change(len(losses) + 1, loss)
        losses.append((loss.detach().clone(), len(args[1])))
        return loss

    monkeypatch.setattr(train_module, "episode_loss", wrapped)
    return losses


def test_device_sum_of_float32_losses_equals_the_python_float_sum():
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 3
    total, dev = 0.0, torch.zeros((), dtype=torch.float64)
    for i, v in enumerate(values):
        n = 1 + i % 8
        total += float(v) * n
        dev += v.double() * n
    assert float(dev) == total


def test_train_loss_curve_is_the_python_float_mean_of_the_step_losses(tmp_path, monkeypatch):
    index, store = toy_dataset(tmp_path)
    losses = recorded_losses(monkeypatch)
    per_epoch, bs = 100, 8  # 13 steps an epoch: a check after step 10 and at the epoch's end
    res = run_train(index, store, None, epochs=2, episodes_per_epoch=per_epoch, batch_size=bs)
    steps = -(-per_epoch // bs)
    for e, row in enumerate(res.curve):
        epoch = losses[e * steps : (e + 1) * steps]
        total = 0.0
        for loss, n in epoch:
            total += float(loss) * n
        assert row["train_loss"] == round(total / per_epoch, 6)


def test_divergence_names_the_first_non_finite_step(tmp_path, monkeypatch):
    index, store = toy_dataset(tmp_path)
    recorded_losses(monkeypatch, lambda step, loss: loss * float("nan") if step == 7 else loss)
    # 2 steps an epoch: step 7 is epoch 4's first, read back only at that epoch's end
    with pytest.raises(FscsError) as err:
        run_train(index, store, None, epochs=5)
    message = str(err.value)
    assert message.startswith("training diverged at epoch 4, step 7 (loss nan); the step size is set by ")
    assert message.endswith(": lower train.lr")


def test_huge_learning_rate_names_the_step_whose_loss_was_first_non_finite(tmp_path, monkeypatch):
    index, store = toy_dataset(tmp_path)
    losses = recorded_losses(monkeypatch)
    monkeypatch.setattr(train_module, "LOG_EVERY", 3)
    with pytest.raises(FscsError, match="training diverged") as err:
        run_train(index, store, None, lr=1e30, epochs=4, episodes_per_epoch=64)
    first = next(i for i, (loss, _) in enumerate(losses) if not torch.isfinite(loss))
    epoch = 1 + first // 8
    assert f"at epoch {epoch}, step {first + 1} (loss {losses[first][0].item()})" in str(err.value)
    assert "train.lr = 1e+30" in str(err.value)


# ---- the stand-ins' interpolation matrices ---------------------------------------------------------------
def test_bilinear_matrices_are_cached_equal_and_bounded(monkeypatch):
    like = torch.zeros(1, dtype=torch.float32)
    a = deterministic._bilinear_matrix(7, 13, 7 / 13, like)
    assert deterministic._bilinear_matrix(7, 13, 7 / 13, like) is a
    fresh = deterministic._cached_matrix.__wrapped__(7, 13, 7 / 13, like.device, like.dtype)
    assert torch.equal(a, fresh) and a.dtype == torch.float32
    for n in range(2, 2 + 2 * deterministic.MATRIX_CACHE):
        deterministic._bilinear_matrix(n, 2 * n, 0.5, like)
    assert deterministic._cached_matrix.cache_info().currsize <= deterministic.MATRIX_CACHE
    monkeypatch.setattr(deterministic, "stand_in", lambda t: True)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    ref = F.interpolate(x, size=(9, 11), mode="bilinear", align_corners=False)
    torch.testing.assert_close(deterministic.interpolate_bilinear(x, size=(9, 11)), ref)


def test_a_matrix_first_built_in_inference_mode_still_trains(monkeypatch):
    monkeypatch.setattr(deterministic, "stand_in", lambda t: True)
    deterministic._cached_matrix.cache_clear()
    with torch.inference_mode():
        deterministic.interpolate_bilinear(torch.randn(1, 1, 3, 3), size=(17, 19))
    x = torch.randn(1, 1, 3, 3, requires_grad=True)
    deterministic.interpolate_bilinear(x, size=(17, 19)).sum().backward()
    assert x.grad is not None


# ---- the fused CPU attention kernel refuses other devices ------------------------------------------------
def test_fused_attention_refuses_a_tensor_off_the_cpu_by_name():
    from fscs.learn.model import fused_attention as fa

    q, kv = torch.randn(2, 3, 2, 4), torch.randn(2, 5, 2, 2, 4)
    valid = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(
        ValueError, match="tiny_attention: kv is on meta, but the fused kernel runs on the CPU"
    ):
        fa.tiny_attention(q, kv.to("meta"), valid)
    with pytest.raises(ValueError, match="key_valid is on meta"):
        fa.tiny_attention(q, kv, valid.to("meta"))
    with pytest.raises(RuntimeError, match="q must be on the CPU, got a tensor on meta"):
        fa.kernel().forward(q.to("meta"), kv, valid.to(torch.uint8), False)


# ---- Dask: no more GPU workers than GPUs unless asked ----------------------------------------------------
def test_gpu_workers_beyond_the_visible_gpus_are_refused_unless_shared(monkeypatch):
    from flows import dask_pipeline as dp

    def env(specs):
        return [s["options"].get("env", {}).get("CUDA_VISIBLE_DEVICES") for s in specs.values()]

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        FscsError, match=r"2 GPU workers but only 1 visible GPU.*--gpu-workers 1.*--share-gpus"
    ):
        dp.worker_specs(3, 2)
    assert env(dp.worker_specs(3, 2, share_gpus=True)) == ["0", "0", None]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert env(dp.worker_specs(3, 2)) == ["0", "1", None]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no CUDA: only the Dask resource, as before
    specs = dp.worker_specs(3, 2)
    assert env(specs) == [None, None, None]
    assert [s["options"].get("resources") for s in specs.values()] == [{"GPU": 1}, {"GPU": 1}, None]


def test_dask_flow_cli_has_the_share_gpus_flag(capsys):
    from flows import dask_pipeline as dp

    with pytest.raises(SystemExit):
        dp.main(["--help"])
    assert "--share-gpus" in capsys.readouterr().out


# ---- the Labeler: store rows cached, the enhancer on the caller's CUDA device ----------------------------
class CountingStore:
    """Seeded random CLS queries and patch keys (2 heads, 2 x 2 grid) of images a..d, counting reads."""

    grid = (2, 2)
    attrs = {"grid": [2, 2], "num_heads": 2}

    def __init__(self):
        rng = np.random.default_rng(0)
        self.q = {i: rng.standard_normal((2, 3)).astype(np.float16) for i in "abcd"}
        self.k = {i: rng.standard_normal((2, 4, 3)).astype(np.float16) for i in "abcd"}
        self.reads = 0

    def cls_query(self, image_id):
        self.reads += 1
        return self.q[image_id]

    def patch_keys(self, image_id):
        self.reads += 1
        return self.k[image_id]


def test_labeler_reads_each_store_row_once_with_the_same_maps():
    from fscs.pseudo.attention import Labeler, cst_foreground, head_cosine

    store = CountingStore()
    labeler = Labeler(store)
    first = [labeler.pair_fg(s, q) for s in "ab" for q in "cd"]
    again = [labeler.pair_fg(s, q) for s in "ab" for q in "cd"]
    assert store.reads == 4  # the CLS queries of a, b and the keys of c, d
    for (s, q), a, b in zip([(s, q) for s in "ab" for q in "cd"], first, again, strict=True):
        want = cst_foreground(head_cosine(store.q[s], store.k[q], True).reshape(2, 2, 2))
        np.testing.assert_array_equal(a, want)
        np.testing.assert_array_equal(b, want)


def test_enhancer_goes_to_the_cuda_device_in_use_and_stays_put_on_the_cpu(monkeypatch):
    from fscs.pseudo import attention

    moved = []

    class Enhancer:
        def to(self, device):
            moved.append(device)
            return self

        def eval(self):
            return self

    monkeypatch.setattr(attention, "load_enhancer", lambda path, fold=None: Enhancer())
    monkeypatch.setattr(attention, "resolve_device", lambda: torch.device("cpu"))
    attention.Labeler(CountingStore(), enhancer="enhancer.pt")
    assert moved == []
    monkeypatch.setattr(attention, "resolve_device", lambda: torch.device("cuda", 0))
    attention.Labeler(CountingStore(), enhancer="enhancer.pt")
    assert moved == [torch.device("cuda", 0)]


# ---- the GPU smoke's toy run -----------------------------------------------------------------------------
def test_gpu_smoke_tiny_runs_every_cell_on_the_cpu():
    cmd = [sys.executable, "-m", "benchmarks.gpu_smoke", "--device", "cpu", "--tiny", "--images", "4"]
    cmd += ["--batch", "2", "--steps", "2", "--cpu-steps", "2", "--paper-steps", "1", "--paper-episodes", "4"]
    cmd += ["--paper-images", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "0 failed check(s)" in out.stdout and "paper cell on cpu" in out.stdout
    assert "steps/s, peak GPU memory n/a" in out.stdout and "images/s" in out.stdout
