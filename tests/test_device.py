"""The device rule (FSCS_DEVICE), bf16 extraction against fp32, device/precision in stores and reports, the
CUDA stand-ins of `fscs.core.deterministic` checked on the CPU, and CUDA runs (marked ``cuda``, skipped
here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_extract
import torch
import torch.nn.functional as F
import yaml
from test_train import run_train, toy_dataset, val_frame

from fscs.config.params import validate_section
from fscs.core import deterministic
from fscs.core.device import CUBLAS_WORKSPACE, ENV, autocast, resolve_device
from fscs.core.errors import FscsError
from fscs.features.backbone import create_backbone
from fscs.features.store import FeatureStore, check_attrs, expected_attrs
from stages import extract_shard as extract_stage

ROOT = Path(__file__).resolve().parent.parent

#: bf16 autocast vs fp32 on the tiny random ViT (tokens through the final LayerNorm, O(1) values)
BF16_MAX_ABS = 0.1
BF16_MIN_COS = 0.999


def expect(params: dict) -> dict:
    """The store attributes params.yaml's ``backbone`` section expects."""
    return expected_attrs(validate_section("backbone", params["backbone"]))


def test_resolve_device_values(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(" AUTO ") == torch.device("cpu")
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_device() == torch.device("cpu")
    monkeypatch.setenv(ENV, "cpu")
    assert resolve_device() == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cuda:-1", "cuda0", "mps"):
        with pytest.raises(FscsError, match=f"{ENV}='{bad}': expected auto, cpu, cuda"):
            resolve_device(bad)
    for absent in ("cuda", "cuda:0"):
        with pytest.raises(FscsError, match="CUDA is not available"):
            resolve_device(absent)


def test_cuda_resolution_sets_the_cublas_workspace(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(FscsError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


def test_precision_values_and_the_fused_refusal():
    with pytest.raises(FscsError, match="fp16"):
        autocast(torch.device("cpu"), "fp16")
    with pytest.raises(FscsError, match="set fused: false"):
        validate_section("backbone", {"name": "vit_tiny_random", "precision": "bf16"})
    with pytest.raises(FscsError, match="precision"):
        validate_section("backbone", {"name": "vit_tiny_random", "precision": "fp16"})
    ok = validate_section("backbone", {"name": "vit_tiny_random", "precision": "bf16", "fused": False})
    assert ok.precision == "bf16"
    assert not create_backbone("vit_tiny_random", 32, fused=True, precision="bf16").fused  # API: timm blocks


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def test_bf16_extraction_within_tolerance_of_fp32():
    fp32 = create_backbone("vit_tiny_random", 64, fused=False)
    bf16 = create_backbone("vit_tiny_random", 64, fused=False, precision="bf16")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = fp32.extract(x), bf16.extract(x)
    for name in ("tokens", "cls_query", "patch_keys"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert tb.dtype == torch.float32 and ta.shape == tb.shape
        assert 0 < (ta - tb).abs().max() < BF16_MAX_ABS, name  # not fp32 in disguise, and close
        assert _cosine(ta, tb).min() > BF16_MIN_COS, name
    assert a.cpu() is a  # already on the CPU: no copy


def test_store_and_report_record_device_and_precision(tmp_path, monkeypatch):
    _, index, params_file, params = test_extract.setup(tmp_path, n=3)
    params["backbone"].update(precision="bf16", fused=False)
    params_file.write_text(yaml.safe_dump(params))
    monkeypatch.setenv(ENV, "cpu")
    extract_stage.main(test_extract.argv(tmp_path, index, params_file))
    report = json.loads((tmp_path / "extract.json").read_text())
    assert report["device"] == "cpu" and report["precision"] == "bf16"
    with FeatureStore(tmp_path / "f.h5", expect(params)) as fs:
        assert fs.attrs["device"] == "cpu" and fs.attrs["precision"] == "bf16" and not fs.attrs["fused"]
        # the device is recorded, never compared: a store made elsewhere opens here
        check_attrs(
            {**fs.attrs, "device": "cuda:0 (some GPU)"},
            expect(params),
            "store",
        )
    params["backbone"].update(precision="fp32")
    with pytest.raises(FscsError, match="'precision' is 'bf16' in the store but the params ask for 'fp32'"):
        FeatureStore(tmp_path / "f.h5", expect(params))
    old = {k: v for k, v in fs.attrs.items() if k != "precision"}  # written before the attribute: fp32
    check_attrs(old, expect(params), "old store")
    with pytest.raises(FscsError, match="precision"):
        check_attrs(
            old,
            expect({"backbone": {**params["backbone"], "precision": "bf16"}}),
            "s",
        )


def test_bad_device_stops_extraction_before_output(tmp_path, monkeypatch):
    _, index, params_file, _ = test_extract.setup(tmp_path, n=2)
    monkeypatch.setenv(ENV, "tpu")
    with pytest.raises(FscsError, match=ENV):
        extract_stage.main(test_extract.argv(tmp_path, index, params_file))
    assert not list(tmp_path.glob("f.h5*")) and not (tmp_path / "extract.json").exists()


@pytest.mark.parametrize(("size", "out"), [((4, 4), (8, 8)), ((7, 5), (13, 16)), ((16, 16), (64, 64))])
def test_bilinear_stand_in_matches_interpolate(monkeypatch, size, out):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = F.interpolate(x, size=out, mode="bilinear", align_corners=False)
    want2 = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    monkeypatch.setattr(deterministic, "stand_in", lambda t: True)
    torch.testing.assert_close(deterministic.interpolate_bilinear(x, size=out), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        deterministic.interpolate_bilinear(x, scale_factor=2), want2, rtol=0, atol=1e-12
    )


def test_cross_entropy_stand_in_matches_torch(monkeypatch):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 2, (3, 5, 5), generator=g)
    target[0, :2] = 255
    cls_logits, presence = torch.randn(4, 2, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    want_sum = F.cross_entropy(logits, target, ignore_index=255, reduction="sum")
    want_mean = F.cross_entropy(cls_logits, presence)
    monkeypatch.setattr(deterministic, "stand_in", lambda t: True)
    got_sum = deterministic.cross_entropy(logits, target, ignore_index=255, reduction="sum")
    torch.testing.assert_close(got_sum, want_sum, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        deterministic.cross_entropy(cls_logits, presence), want_mean, rtol=1e-12, atol=0
    )


def test_training_with_the_stand_ins_is_close_to_the_cpu_ops(tmp_path, monkeypatch):
    index, store = toy_dataset(tmp_path)
    a = run_train(index, store, None, epochs=1)
    monkeypatch.setattr(deterministic, "stand_in", lambda t: True)
    b = run_train(index, store, None, epochs=1)
    assert a.device == b.device == "cpu"
    assert a.curve[0]["train_loss"] == pytest.approx(b.curve[0]["train_loss"], rel=1e-4)


# ---- on a GPU only ---------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_extraction_matches_cpu(precision):
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cpu = create_backbone("vit_tiny_random", 64, fused=False, precision=precision).extract(x)
    gpu = create_backbone("vit_tiny_random", 64, device=torch.device("cuda"), precision=precision).extract(x)
    assert gpu.tokens.is_cuda
    back = gpu.cpu()
    tol = 1e-3 if precision == "fp32" else BF16_MAX_ABS
    for name in ("tokens", "cls_query", "patch_keys"):
        assert (getattr(back, name) - getattr(cpu, name)).abs().max() < tol, name


@pytest.mark.cuda
def test_cuda_training_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    index, store = toy_dataset(tmp_path)
    a = run_train(index, store, val_frame(index))
    b = run_train(index, store, val_frame(index))
    assert a.device.startswith("cuda:")
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert [r["train_loss"] for r in a.curve] == [r["train_loss"] for r in b.curve]
    assert np.isfinite(a.curve[-1]["train_loss"])


def test_gpu_smoke_imports_no_params_layer():
    """The GPU machine has torch, timm, h5py, numpy but not pydantic / dvc / prefect: keep them out."""
    code = (
        "import sys, benchmarks.gpu_smoke; print(sorted({'pydantic', 'dvc', 'prefect'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
