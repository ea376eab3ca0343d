"""Faults that used to pass silently or end in a traceback: a store region zeroed with its checksum, a full
disk, learning rates that cannot train, checkpoint fields of the wrong type, partial files of killed writers,
pickled payloads. Each ends in exit code 2 with one line naming the file or param, and earlier outputs stay
byte-identical."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import yaml
from conftest import build_voc
from test_refusals import (
    build,
    earlier_outputs,
    predict_refused,
    refused,
    snapshot,
    stage,
    stage_argv,
    tiny_params,
)

from fscs.core.errors import FscsError
from fscs.core.io import atomic_path, load_torch, remove_stale_partials
from fscs.features.store import DIGESTED, FeatureStore, StoreWriter

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> SimpleNamespace:
    """The tiny VOC fixture through prepare, extract and pseudo, plus a pixel checkpoint of fold 0."""
    tmp = tmp_path_factory.mktemp("faults")
    build_voc(tmp / "voc", per_class=4)
    a = build(tmp, tiny_params(tmp / "voc"))
    stage("pseudo").main(stage_argv("pseudo", a, a.pseudo.parent, a.params))  # writes a.pseudo
    models = tmp / "models"
    stage("train").main(stage_argv("train", a, models, a.params))
    a.checkpoint = models / "model.pt"
    return a


def copy_store(art: SimpleNamespace, tmp_path: Path) -> Path:
    features = tmp_path / "features.h5"
    features.write_bytes(art.features.read_bytes())
    return features


def zero_chunk(path: Path, name: str, row: int) -> None:
    """Zero the whole chunk of row ``row`` of dataset ``name``, its Fletcher32 checksum included."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info_by_coord((row,) + (0,) * (f[name].ndim - 1))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(bytes(info.size))


# ---- a zeroed chunk: Fletcher32 alone accepts it, the per-row CRC-32 does not -----------------------------
def test_fletcher32_alone_accepts_a_zeroed_chunk(tmp_path):
    """Why the store carries its own digests: HDF5 reads a chunk zeroed with its checksum without error."""
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.ones((3, 256), np.float16), chunks=(1, 256), fletcher32=True)
    zero_chunk(path, "x", 1)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["x"][1], 0)  # no error: the damage would pass silently


@pytest.mark.parametrize(
    "name, dataset", [("pseudo", "patch_keys"), ("train", "tokens"), ("baselines", "patch_keys")]
)
def test_zeroed_row_refused_on_read(art, tmp_path, capsys, name, dataset):
    features = copy_store(art, tmp_path)
    image_id = "train_4_0"  # an image of a fold-0 training class, read by pseudo and train
    if name == "baselines":  # which scores fold 0's test episodes
        from fscs.data.episodes import read_episodes

        episodes = read_episodes(art.episodes / "test.parquet")
        image_id = str(episodes[episodes["fold"] == 0]["query_id"].iloc[0])
    with FeatureStore(features) as store:
        row = store.row(image_id)
    zero_chunk(features, dataset, row)
    out = tmp_path / "out"
    before = earlier_outputs(out)
    a = SimpleNamespace(**{**vars(art), "features": features})
    line = refused(name, stage_argv(name, a, out, art.params), capsys)
    assert f"{features}: dataset '{dataset}' is damaged: rows {row} ({image_id!r}) fail" in line, line
    assert "CRC-32" in line
    assert snapshot(out) == before


def test_zeroed_digests_refused_for_every_row_they_cover(art, tmp_path):
    features = copy_store(art, tmp_path)
    zero_chunk(features, "digests", 0)  # one chunk of the small digests dataset: many rows at once
    with FeatureStore(features) as store, pytest.raises(FscsError) as exc:
        store.patch_keys(store.image_ids[0])
    assert f"dataset 'patch_keys' is damaged: rows 0 ({store.image_ids[0]!r}), 1 (" in str(exc.value)


def test_a_row_moved_to_another_image_is_refused(art, tmp_path):
    """The digest is seeded with the image id: another image's intact row does not pass for this one's."""
    features = copy_store(art, tmp_path)
    with h5py.File(features, "r+") as f:
        f["cls_query"][1] = f["cls_query"][0]
        f["digests"][1] = f["digests"][0]
    with FeatureStore(features) as store:
        store.cls_query(store.image_ids[0])
        with pytest.raises(FscsError, match=r"dataset 'cls_query' is damaged: rows 1 "):
            store.cls_query(store.image_ids[1])


def test_digests_cover_every_per_image_dataset(art):
    with FeatureStore(art.features) as store:
        assert DIGESTED == ("tokens", "cls_query", "patch_keys")
        assert store.read_all("digests").shape == (len(store), 3)
        assert store.read_all("digests").all()  # a zero digest would be indistinguishable from damage


# ---- a full disk: one line, exit 2, no partial left, earlier outputs intact -------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs filled to its last block (needs root and mount; skipped otherwise)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the file system holding ``folder`` up to ``leave`` free bytes."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as fh:
        fh.write(bytes(max(0, free - leave)))


def run_cli(module: str, argv: list[str], cwd: Path = ROOT, prelude: str = "") -> subprocess.CompletedProcess:
    """Run ``python -m <module> argv`` in a fresh interpreter (``prelude``: code run before it)."""
    run = (
        f"import runpy, sys\nsys.argv = ['{module}', *{argv!r}]\n"
        f"runpy.run_module('{module}', run_name='__main__')"
    )
    code = textwrap.dedent(prelude) + "\n" + run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 2, no traceback, and one `error: ...` line, the last (progress lines may come before it)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-2000:]
    return errors[0]


FULL_DISK_STAGES = ("prepare", "extract_shard", "pseudo", "enhancer", "baselines", "train", "evaluate")


@pytest.mark.parametrize("name", FULL_DISK_STAGES)
def test_full_disk_is_one_line_for_every_stage(art, full_disk, name):
    out = full_disk / "out"
    out.mkdir()
    (out / "features.h5").write_bytes(b"an earlier store")
    (out / "model.pt").write_bytes(art.checkpoint.read_bytes())  # evaluate's input; train's earlier output
    before = snapshot(out)
    fill(full_disk)
    proc = run_cli(f"stages.{name}", stage_argv(name, art, out, art.params)[0:])
    line = one_error_line(proc)
    assert ": no space left on device" in line and str(out) in line, line
    assert snapshot(out) == before  # no partial file, earlier outputs byte-identical


def test_full_disk_extract_names_the_space_it_needs_and_reruns_once_freed(art, full_disk):
    out = full_disk / "out"
    args = stage_argv("extract_shard", art, out, art.params)
    fill(full_disk, leave=64 << 10)
    line = one_error_line(run_cli("stages.extract_shard", args))
    assert (
        line.startswith(f"error: {out / 'features.h5'}: no space left on device (") and "needs about" in line
    )
    assert not list(out.glob("*.partial")) and not (out / "features.h5").exists()
    (full_disk / "filler").unlink()
    proc = run_cli("stages.extract_shard", args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with FeatureStore(out / "features.h5") as a, FeatureStore(art.features) as b:
        for dataset in ("tokens", "patch_keys", "digests"):
            np.testing.assert_array_equal(a.read_all(dataset), b.read_all(dataset))


def test_disk_filled_by_another_process_during_extraction(art, full_disk):
    """The space was there when extraction reserved it, then went: HDF5's write fails mid-way. One line, exit
    2 (not h5py's crash on close), and the partial file removed so that the disk is free again."""
    out = full_disk / "out"
    fill(full_disk, leave=200 << 10)  # less than the store needs (about 340 KB) ...
    prelude = """
        import os
        os.posix_fallocate = lambda fd, offset, length: None  # ... but the reservation "succeeds"
    """
    line = one_error_line(
        run_cli("stages.extract_shard", stage_argv("extract_shard", art, out, art.params), prelude=prelude)
    )
    assert line.startswith(f"error: {out / 'features.h5'}: no space left on device"), line
    assert not list(out.glob("*partial*")) and not (out / "features.h5").exists()


def test_store_written_in_reserved_space_is_trimmed_to_its_data(art, tmp_path):
    """The reservation is released when the store closes: the file is as large as without it."""
    with FeatureStore(art.features) as src:
        ids, attrs = src.image_ids[:4], {k: v for k, v in src.attrs.items() if k != "complete"}
        rows = {d: src.read_all(d)[:4] for d in DIGESTED}
    path = tmp_path / "s.h5"
    shapes = {d: rows[d].shape[1:] for d in DIGESTED}
    with StoreWriter(path, ids, attrs, shapes) as w:
        reserved = w.partial.stat().st_size
        assert reserved >= 4 * w.row_bytes()  # reserved before any row is written
        w.write(range(4), rows["tokens"], rows["cls_query"], rows["patch_keys"])
        w.finalize()
    assert 4 * w.row_bytes() < path.stat().st_size < reserved
    with FeatureStore(path) as store:
        np.testing.assert_array_equal(store.read_all("tokens"), rows["tokens"])


def test_injected_enospc_in_an_atomic_write_names_the_output(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the same refusal from an injected ENOSPC, temporary file removed."""
    import errno

    import fscs.core.io

    target = tmp_path / "out.json"
    target.write_text("earlier")

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(fscs.core.io.os, "replace", no_space)
    with pytest.raises(FscsError, match=rf"{target}: no space left on device \("):
        fscs.core.io.write_json(target, {"a": 1})
    monkeypatch.undo()
    assert target.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


# ---- learning rates that cannot train: refused by the config layer; a divergence names the step size ------
@pytest.mark.parametrize("value", [float("nan"), -0.001, float("inf"), 0.0])
@pytest.mark.parametrize("name", ["train", "evaluate", "prepare"])
def test_learning_rate_must_be_finite_and_positive(art, tmp_path, capsys, name, value):
    params = yaml.safe_load(art.params.read_text())
    params["train"]["lr"] = value
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    before = earlier_outputs(out)
    line = refused(name, stage_argv(name, art, out, p), capsys)
    assert line == f"error: params: train.lr must be a finite number > 0, got {value!r}"
    assert snapshot(out) == before


def test_enhancer_learning_rate_must_be_finite(art, tmp_path, capsys):
    params = yaml.safe_load(art.params.read_text())
    params.setdefault("enhancer", {})["lr"] = float("inf")
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    line = refused("enhancer", stage_argv("enhancer", art, tmp_path / "out", p), capsys)
    assert line == "error: params: enhancer.lr = inf: expected a finite number"


def test_divergence_names_the_params_that_set_the_step_size(art, tmp_path, capsys):
    params = yaml.safe_load(art.params.read_text())
    params["train"].update(lr=1e30, epochs=2, episodes_per_epoch=8)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    before = earlier_outputs(out)
    line = refused("train", stage_argv("train", art, out, p), capsys)
    assert "training diverged at epoch " in line and "train.lr = 1e+30" in line and "lower train.lr" in line
    assert snapshot(out) == before


# ---- checkpoint config fields validated by type, for predict and evaluate --------------------------------
FORGED = [
    ("grid", "abc", "config.grid = 'abc': expected a list"),
    ("kshot", "max", "config.kshot = 'max': expected 'mean_prob', 'mean_logit' or 'joint'"),
    ("label_size", 0, "config.label_size = 0: expected >= 1"),
    ("fg_threshold", float("nan"), "config.fg_threshold = nan: expected a finite number"),
]


def forge(art, tmp_path: Path, mutate) -> Path:
    import torch

    ckpt = torch.load(art.checkpoint, weights_only=True)
    mutate(ckpt)
    path = tmp_path / "forged" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("key, value, message", FORGED, ids=[f[0] for f in FORGED])
@pytest.mark.parametrize("tool", ["predict", "evaluate"])
def test_forged_checkpoint_field_named(art, tmp_path, capsys, tool, key, value, message):
    ckpt = forge(art, tmp_path, lambda c: c["config"].__setitem__(key, value))
    if tool == "predict":
        err = predict_refused(ckpt, art, tmp_path / "pred", capsys).strip()
        assert err == f"error: {ckpt}: {message}", err
        return
    out = tmp_path / "out"
    before = earlier_outputs(out)
    argv = stage_argv("evaluate", art, out, art.params)
    argv[argv.index(str(out / "model.pt"))] = str(ckpt)
    assert refused("evaluate", argv, capsys) == f"error: {ckpt}: {message}"
    assert snapshot(out) == before


@pytest.mark.parametrize("tool", ["predict", "evaluate"])
def test_checkpoint_config_that_is_not_a_mapping(art, tmp_path, capsys, tool):
    ckpt = forge(art, tmp_path, lambda c: c.__setitem__("config", [1, 2]))
    want = f"error: {ckpt}: checkpoint config is list, not a mapping"
    if tool == "predict":
        assert predict_refused(ckpt, art, tmp_path / "pred", capsys).strip() == want
        return
    argv = stage_argv("evaluate", art, tmp_path / "out", art.params)
    argv[argv.index(str(tmp_path / "out" / "model.pt"))] = str(ckpt)
    assert refused("evaluate", argv, capsys) == want


# ---- a pickled payload: one line, never run, no advice to turn the protection off ------------------------
class Payload:
    """Unpickling this would create a file: the test checks that it never exists."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("what", ["cst", "enhancer", "backbone"])
def test_pickle_payload_refused_in_one_line(tmp_path, what):
    import torch

    from fscs.features.weights import load_state_dict_file
    from fscs.learn.model.cst import read_checkpoint
    from fscs.pseudo.enhancer import load_enhancer

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "config": Payload(str(tmp_path / "payload-ran"))}, path)
    load = {"cst": read_checkpoint, "enhancer": load_enhancer, "backbone": load_state_dict_file}[what]
    with pytest.raises(FscsError) as exc:
        load(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: holds Python objects other than tensors and plain values")
    assert "\n" not in message and "weights_only" not in message
    assert not (tmp_path / "payload-ran").exists()


def test_unreadable_torch_file_is_one_line(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(FscsError) as exc:
        load_torch(path, "CST checkpoint")
    assert str(exc.value).startswith(f"{path}: not a readable CST checkpoint (")
    assert "\n" not in str(exc.value) and "weights_only" not in str(exc.value)


# ---- partial files of writers that were killed -----------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partials_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    final = tmp_path / "fold0.pt"
    dead = tmp_path / f".fold0.pt.{dead_pid()}.partial"
    live = tmp_path / f".fold0.pt.{os.getppid()}.partial"
    other = tmp_path / f".fold1.pt.{dead_pid()}.partial"
    for p in (dead, live, other):
        p.write_bytes(b"x" * 1000)
    assert remove_stale_partials(final) == [dead]
    assert live.exists() and other.exists() and not dead.exists()
    with atomic_path(final) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new"


def test_train_after_a_killed_checkpoint_write_leaves_no_partial(art, tmp_path):
    """kill -9 during `torch.save`'s write leaves `.model.pt.<pid>.partial`; the next run removes it."""
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".model.pt.{dead_pid()}.partial"
    stale.write_bytes(b"half a checkpoint")
    stage("train").main(stage_argv("train", art, out, art.params))
    assert (out / "model.pt").is_file() and not stale.exists()
    assert not list(out.glob(".*.partial"))


# ---- the Dask flow's remote is the user's choice on the command line, not a flow parameter ----------------
def test_the_dask_flow_takes_no_remote():
    """A run started through the Prefect API (no authentication) must not pick where the data goes."""
    from flows.dask_pipeline import fscs_pipeline_dask, main

    params = set(fscs_pipeline_dask.parameters.properties)
    assert params == {"supervisions", "folds", "gpu_resource", "cpu_workers"}
    assert "set_remote(ROOT" in inspect.getsource(main)


# ---- no warning on every train and evaluate run ------------------------------------------------------------
def test_nearest_resize_of_a_read_only_mask_warns_nothing():
    from fscs.core.resample import nearest_torch

    mask = np.arange(16, dtype=np.uint8).reshape(4, 4)
    mask.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = nearest_torch(mask, 8)
    np.testing.assert_array_equal(out[::2, ::2], mask)


@pytest.mark.parametrize("platform", ["no posix_fallocate", "EOPNOTSUPP"])
def test_without_preallocation_the_free_space_is_checked(art, tmp_path, monkeypatch, platform):
    """macOS has no posix_fallocate, some network file systems refuse it: the store then compares the free
    space with what it needs, before any row is computed."""
    import collections
    import errno

    import fscs.features.store

    if platform == "no posix_fallocate":
        monkeypatch.delattr(fscs.features.store.os, "posix_fallocate", raising=False)
    else:

        def refuse(fd, offset, length):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(fscs.features.store.os, "posix_fallocate", refuse)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(fscs.features.store.shutil, "disk_usage", lambda p: usage(1 << 30, 0, 1000))
    with FeatureStore(art.features) as src:
        ids, attrs = src.image_ids[:2], {k: v for k, v in src.attrs.items() if k != "complete"}
        shapes = {d: src.read_all(d).shape[1:] for d in DIGESTED}
    path = tmp_path / "s.h5"
    with pytest.raises(FscsError, match=rf"{path}: no space left on device \(0.0 MB free there; it needs"):
        StoreWriter(path, ids, attrs, shapes)
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(fscs.features.store.shutil, "disk_usage", lambda p: usage(1 << 30, 0, 1 << 30))
    StoreWriter(path, ids, attrs, shapes).close()  # enough room: a partial file to write into
    assert (tmp_path / "s.h5.partial").is_file()
