"""The fused CPU attention kernel: torch's attention numbers, gradients, masking, threads, build errors."""

from __future__ import annotations

import pytest
import torch

import fscs.learn.model.fused_attention as fa
from fscs.cli import main as cli_main
from fscs.core.errors import FscsError
from fscs.learn.model import CST
from fscs.learn.model.fused_attention import sdpa_attention, tiny_attention
from tests.test_model import tiny_config, tokens

# (N, nq, nk, H, d): CST's block 1 and block 2 on the default store, and key counts off the vector width
SHAPES = [(48, 10, 37, 8, 4), (48, 2, 10, 8, 16), (7, 3, 5, 2, 3), (5, 1, 17, 4, 8)]


def problems(n, nq, nk, h, d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(n, nq, h, d, generator=g)).requires_grad_()
    kv = (scale * torch.randn(n, nk, 2, h, d, generator=g)).requires_grad_()
    valid = torch.rand(n, nk, generator=g) > 0.4
    valid[:, 0] = True
    valid[0, 1:] = False  # one problem with only its first key
    return q, kv, valid, torch.randn(n, nq, h, d, generator=g)


def run(fn, q, kv, valid, grad):
    q, kv = q.detach().clone().requires_grad_(), kv.detach().clone().requires_grad_()
    out = fn(q, kv, valid)
    out.backward(grad)
    return out.detach(), q.grad, kv.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_attention_matches_torch_attention_and_its_gradients(shape):
    q, kv, valid, grad = problems(*shape)
    fused, ref = run(tiny_attention, q, kv, valid, grad), run(sdpa_attention, q, kv, valid, grad)
    for a, b, what in zip(fused, ref, ("output", "grad q", "grad kv"), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=what)
    assert fused[1].abs().sum() > 0 and fused[2].abs().sum() > 0


def test_masked_keys_get_no_weight_and_no_gradient():
    q, kv, valid, grad = problems(6, 4, 9, 2, 4)
    changed = kv.detach().clone()
    changed[:, :, 0][~valid] = 1e4  # huge keys where masked: must not move anything
    changed[:, :, 1][~valid] = -1e4
    a, _, gkv = run(tiny_attention, q, kv, valid, grad)
    b, _, _ = run(tiny_attention, q, changed, valid, grad)
    torch.testing.assert_close(a, b)
    assert torch.all(gkv[~valid] == 0)
    torch.testing.assert_close(a[0], kv.detach()[0, 0, 1].expand(4, 2, 4))  # only key 0: its value


def test_large_logits_stay_finite_and_match_torch():
    q, kv, valid, grad = problems(8, 3, 37, 2, 4, scale=30.0)  # logits in the thousands: one-hot softmax
    fused, ref = run(tiny_attention, q, kv, valid, grad), run(sdpa_attention, q, kv, valid, grad)
    assert all(torch.isfinite(t).all() for t in fused)
    torch.testing.assert_close(fused[0], ref[0], atol=1e-3, rtol=1e-4)


def test_same_bits_for_any_thread_count_and_without_grad():
    q, kv, valid, grad = problems(64, 10, 37, 8, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(tiny_attention, q, kv, valid, grad)
        torch.set_num_threads(2)
        two = run(tiny_attention, q, kv, valid, grad)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(tiny_attention(q, kv, valid), one[0])  # the inference path keeps no probs


def test_cst_with_the_kernel_equals_cst_with_torch_attention():
    mask = torch.zeros(3, 32, 32, dtype=torch.bool)
    mask[:, 4:20, 8:30] = True
    outs = {}
    for attention in ("fused", "sdpa"):
        torch.manual_seed(0)
        model = CST(tiny_config(attention=attention, init="he"))
        cls, seg = model(tokens(3), tokens(3, 1), mask)
        (cls.sum() + seg.square().mean()).backward()
        outs[attention] = (cls.detach(), seg.detach(), model.block1.attn.to_kv.weight.grad.clone())
    for a, b in zip(outs["fused"], outs["sdpa"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        CST(tiny_config(attention="flash"))


def test_a_failed_build_names_the_source_and_the_way_out(monkeypatch):
    import torch.utils.cpp_extension as ext

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++: not found")

    monkeypatch.setattr(fa, "_kernel", None)
    monkeypatch.setattr(ext, "load", no_compiler)
    with pytest.raises(FscsError) as err:
        fa.kernel()
    text = str(err.value)
    assert "tiny_attention.cpp" in text and "g++: not found" in text
    assert "train.model.attention: sdpa" in text


def test_build_folder_follows_the_source_content_not_its_path(tmp_path, monkeypatch):
    """Copies of the project (test repositories, Dask workspaces) share a build; a changed kernel does not."""
    here = fa.build_directory()
    copy = tmp_path / "tiny_attention.cpp"
    copy.write_bytes(fa.SOURCE.read_bytes())
    monkeypatch.setattr(fa, "SOURCE", copy)
    assert fa.build_directory() == here
    copy.write_text(copy.read_text() + "\n// changed\n")
    assert fa.build_directory() != here


def test_build_folder_follows_the_cpu_it_is_built_for(monkeypatch):
    """A shared cache never hands one CPU's -march=native build to another CPU."""
    target = fa.native_target()
    assert "-march=" in target  # the compiler's own resolution of native (g++ prints the CPU it chose)
    here = fa.build_directory()
    monkeypatch.setattr(fa, "native_target", lambda: target.replace("[enabled]", "[disabled]"))
    assert fa.build_directory() != here


def test_fscs_kernel_command_builds_and_checks_the_kernel(capsys):
    cli_main(["kernel"])
    out = capsys.readouterr().out
    assert "fused attention kernel ready" in out
    diff = float(out.split("random problems: ")[1].split()[0])
    assert diff < 1e-5
