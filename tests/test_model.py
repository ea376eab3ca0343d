"""CST model: shapes, correlation, masking rules, parameter count, checkpoints, the K-shot predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fscs.core.errors import FscsError
from fscs.learn.model import CST, CSTConfig, check_store, count_parameters, load_checkpoint, save_checkpoint
from fscs.learn.model.correlation import correlation, downsample_support, resize_mask, split_heads
from fscs.learn.model.transformer import CorrelationBlock, SupportAttention, key_mask, pool_support
from fscs.learn.predictor import CSTPredictor, TokenBank

L, H, D, G = 2, 2, 16, (4, 4)


def tiny_config(**kw) -> CSTConfig:
    base = dict(
        num_layers=L, num_heads=H, embed_dim=D, grid=G, support_size=4, channels=(16, 32), pooled_grid=2
    )
    base.update(kw)
    return CSTConfig(**base)


def tokens(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, L, 1 + G[0] * G[1], D, generator=g).to(torch.float16)


def test_forward_shapes_and_float16_input():
    torch.manual_seed(0)
    model = CST(tiny_config()).eval()
    mask = torch.zeros(3, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 8:24] = True
    with torch.no_grad():
        cls, seg = model(tokens(3), tokens(3, 1), mask)
    assert cls.shape == (3, 2) and cls.dtype == torch.float32
    assert seg.shape == (3, 2, 2 * G[0], 2 * G[1])
    assert torch.isfinite(cls).all() and torch.isfinite(seg).all()


def test_wrong_token_shape_is_refused():
    model = CST(tiny_config())
    with pytest.raises(ValueError, match="tokens have shape"):
        model(tokens(1)[:, :, :5], tokens(1), torch.ones(1, 4, 4))


def test_correlation_is_per_layer_per_head_cosine():
    q, s = tokens(1).float(), tokens(1, 1).float()
    x = correlation(q, s, G, H, support_size=G[0])  # no downsampling: support = CLS + all patches
    assert x.shape == (1, L * H, G[0] * G[1], 1 + G[0] * G[1])
    d = D // H
    for layer in range(L):
        for head in range(H):
            qv = q[0, layer, 1:, head * d : (head + 1) * d]
            sv = s[0, layer, :, head * d : (head + 1) * d]
            cos = torch.nn.functional.cosine_similarity(qv[:, None], sv[None], dim=-1)
            torch.testing.assert_close(x[0, layer * H + head], cos, atol=1e-5, rtol=1e-5)
    assert x.abs().max() <= 1 + 1e-5


def test_support_downsampling_keeps_cls_first():
    s = tokens(2).float()
    out = downsample_support(s, G, 2)
    assert out.shape == (2, L, 1 + 4, D)
    torch.testing.assert_close(out[:, :, 0], s[:, :, 0])
    # bilinear 4 -> 2 (align_corners=False) = mean of each 2x2 block
    grid = s[:, :, 1:].reshape(2, L, 4, 4, D)
    torch.testing.assert_close(out[:, :, 1], grid[:, :, :2, :2].mean(dim=(2, 3)))
    assert split_heads(s, H).shape == (2, L * H, 17, D // H)


def test_resize_mask_nonzero_iff_overlap():
    m = torch.zeros(1, 12, 12)
    m[0, 0, 0] = 1  # one pixel in the top-left 3x3 cell
    r = resize_mask(m, 4)
    assert r[0, 0, 0] > 0
    assert (r[0].flatten()[1:] == 0).all()
    assert torch.equal(key_mask(r)[0, :2], torch.tensor([True, True]))
    assert not key_mask(r)[0, 2:].any()
    assert key_mask(torch.zeros(2, 4, 4))[:, 0].all()  # the CLS key is never masked


def test_masked_keys_get_zero_attention():
    torch.manual_seed(0)
    attn = SupportAttention(6, 16, heads=4).eval()
    x_q = torch.randn(2, 5, 3, 6)
    x_kv = torch.randn(2, 5, 10, 6)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[:, 4:] = False
    changed = x_kv.clone()
    changed[:, :, 4:] = torch.randn(2, 5, 6, 6) * 100
    with torch.no_grad():
        torch.testing.assert_close(attn(x_q, x_kv, valid), attn(x_q, changed, valid))
        assert not torch.allclose(
            attn(x_q, x_kv, torch.ones_like(valid)), attn(x_q, changed, torch.ones_like(valid))
        )


def test_cls_key_alone_when_mask_is_empty():
    torch.manual_seed(0)
    attn = SupportAttention(6, 16, heads=4).eval()
    x_q = torch.randn(1, 3, 2, 6)
    x_kv = torch.randn(1, 3, 5, 6)
    valid = key_mask(torch.zeros(1, 2, 2))
    with torch.no_grad():
        out = attn(x_q, x_kv, valid)
        v = attn.to_kv(x_kv)[..., 16:]  # values; with only the CLS key, every query gets the CLS value
    torch.testing.assert_close(out, v[:, :, :1].expand(-1, -1, 2, -1))


def test_block_ignores_masked_support_positions_given_its_pooled_queries():
    torch.manual_seed(0)
    block = CorrelationBlock(8, 16, out_size=2, heads=4).eval()
    x = torch.randn(2, 6, 1 + 16, 8)
    mask = torch.zeros(2, 4, 4)
    mask[:, :2, :2] = 1
    pooled = pool_support(x, 2)
    changed = x.clone()
    grid = changed[:, :, 1:].reshape(2, 6, 4, 4, 8)
    grid[:, :, 2:, :] = torch.randn(2, 6, 2, 4, 8) * 50  # masked-out rows of the support grid
    with torch.no_grad():
        a, ma = block(x, mask, pooled)
        b, mb = block(changed, mask, pooled)
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 6, 1 + 4, 16) and ma.shape == (2, 2, 2)
    assert torch.equal(ma > 0, torch.tensor([[True, False], [False, False]]).expand(2, 2, 2))


def test_empty_support_mask_attends_to_cls_only_and_stays_finite():
    torch.manual_seed(0)
    model = CST(tiny_config()).eval()
    with torch.no_grad():
        cls, seg = model(tokens(2), tokens(2, 1), torch.zeros(2, 4, 4))
    assert torch.isfinite(cls).all() and torch.isfinite(seg).all()


def test_parameter_count_matches_reference_scale():
    cfg = CSTConfig(num_layers=12, num_heads=6, embed_dim=384, grid=(16, 16))
    model = CST(cfg)
    n = count_parameters(model)
    print(f"CST parameters (12 layers x 6 heads, 16x16 grid): {n}")
    assert 300_000 <= n <= 450_000  # reference: 366k


class FakeStore:
    def __init__(self, n: int = 4, seed: int = 0, attrs: dict | None = None):
        g = np.random.default_rng(seed)
        self.data = {
            f"img{i}": g.standard_normal((L, 1 + G[0] * G[1], D)).astype(np.float16) for i in range(n)
        }
        self.attrs = attrs or {"backbone": "fake", "grid": list(G), "num_heads": H, "layers": list(range(L))}
        self.path = "fake.h5"

    def tokens(self, image_id: str) -> np.ndarray:
        return self.data[image_id]


def test_checkpoint_roundtrip_weights_only_and_store_check(tmp_path):
    torch.manual_seed(0)
    store = FakeStore()
    cfg = tiny_config(backbone={"backbone": "fake", "grid": list(G), "num_heads": H, "layers": [0, 1]})
    model = CST(cfg)
    path = tmp_path / "m.pt"
    save_checkpoint(
        path, model, config_extra={"label_size": 32}, fold=1, supervision="pixel", epoch=3, val_miou=None
    )
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["fold"] == 1 and ckpt["config"]["label_size"] == 32
    loaded, _ = load_checkpoint(path, store=store)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    other = FakeStore(attrs={**store.attrs, "backbone": "other"})
    with pytest.raises(FscsError, match="attribute 'backbone'"):
        check_store(loaded.config, other, str(path))
    with pytest.raises(FscsError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_bytes_do_not_depend_on_the_file_name(tmp_path):
    """DVC hashes checkpoints: the same model must give the same md5 whatever (temporary) name it went to."""
    torch.manual_seed(0)
    cfg = tiny_config(backbone={"backbone": "fake", "grid": list(G), "num_heads": H, "layers": [0, 1]})
    model = CST(cfg)
    for name in ("a.pt", "other-name.pt"):
        save_checkpoint(tmp_path / name, model, fold=0, supervision="pixel", epoch=0, val_miou=None)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other-name.pt").read_bytes()


def make_predictor(model: CST, store: FakeStore) -> CSTPredictor:
    def support_mask(image_id: str, class_id: int) -> np.ndarray:
        m = np.zeros((16, 16), dtype=bool)
        k = int(image_id[-1])
        m[k : k + 8, 2:10] = True
        return m

    return CSTPredictor(model, TokenBank(store), support_mask, mask_depends_on_class=False)


def test_predictor_k_shot_averages_over_shots():
    torch.manual_seed(0)
    store = FakeStore()
    pred = make_predictor(CST(tiny_config()), store)
    p1, f1 = pred.predict("img0", [3], [["img1"]])
    p11, f11 = pred.predict("img0", [3], [["img1", "img1"]])
    np.testing.assert_allclose(p11, p1, rtol=1e-6)
    np.testing.assert_allclose(f11, f1, rtol=1e-6)
    p2, f2 = pred.predict("img0", [3], [["img2"]])
    p12, f12 = pred.predict("img0", [3], [["img1", "img2"]])
    np.testing.assert_allclose(p12, (p1 + p2) / 2, rtol=1e-6)
    np.testing.assert_allclose(f12, (f1 + f2) / 2, rtol=1e-5)
    assert f12.shape == (1, 2 * G[0], 2 * G[1]) and p12.shape == (1,)
    # N-way: each class independently; same numbers as its 1-way episode (batched with other pairs)
    fresh = make_predictor(pred.model, store)
    pn, fn = fresh.predict("img0", [3, 5], [["img1", "img2"], ["img3", "img1"]])
    p3, f3 = fresh.predict("img0", [5], [["img3", "img1"]])
    np.testing.assert_allclose(pn[0], p12[0], rtol=1e-5)
    np.testing.assert_allclose(fn[1], f3[0], rtol=1e-5, atol=1e-6)
    assert ((pn >= 0) & (pn <= 1)).all() and ((fn >= 0) & (fn <= 1)).all()


def test_predictor_cache_and_prefetch():
    import pandas as pd

    torch.manual_seed(0)
    store = FakeStore()
    pred = make_predictor(CST(tiny_config()), store)
    episodes = pd.DataFrame(
        {
            "query_id": ["img0", "img0", "img1"],
            "support_classes": [[1], [1, 2], [2]],
            "support_ids": [[["img1"]], [["img1"], ["img2"]], [["img0"]]],
        }
    )
    assert pred.prefetch(episodes, progress=False) == 3  # (img0,img1) shared: masks do not depend on class
    computed = pred.pairs_computed
    pred.predict("img0", [1, 2], [["img1"], ["img2"]])
    assert pred.pairs_computed == computed


def test_scoring_workers_follow_the_attention():
    """The fused kernel parallelises its problems itself: one batch at a time on every thread; torch's
    attention is faster in single-threaded workers, one per thread."""
    from fscs.learn.predictor import scoring_workers

    assert scoring_workers(CST(tiny_config(attention="fused")), 2) == 1
    assert scoring_workers(CST(tiny_config(attention="sdpa")), 2) == 2
    assert scoring_workers(CST(tiny_config(attention="sdpa")), 0) == 1


def test_prefetch_workers_give_the_single_threaded_numbers_and_restore_torch_threads():
    """Scoring workers run torch single-threaded, in their own threads; every pair's numbers are those of
    one worker with one torch thread, and the caller's thread count comes back."""
    import threading

    import pandas as pd

    from fscs.learn.predictor import torch_threads

    torch.manual_seed(0)
    store = FakeStore(n=8)
    model = CST(tiny_config())
    ids = list(store.data)
    episodes = pd.DataFrame(
        {
            "query_id": ids,
            "support_classes": [[1, 2]] * len(ids),
            "support_ids": [[[ids[(i + 1) % 8], ids[(i + 2) % 8]], [ids[(i + 3) % 8]]] for i in range(8)],
        }
    )
    seen: list[tuple[str, int]] = []

    def support_mask(image_id: str, class_id: int) -> np.ndarray:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        m = np.zeros((16, 16), dtype=bool)
        m[int(image_id[-1]) : int(image_id[-1]) + 8, 2:10] = True
        return m

    def scores(workers: int) -> dict:
        pred = CSTPredictor(model, TokenBank(store), support_mask, batch_size=2, workers=workers)
        assert pred.prefetch(episodes, progress=False) == 24 == pred.pairs_computed
        return dict(pred._cache)

    with torch_threads(1):
        single = scores(1)
    torch.set_num_threads(3)
    seen.clear()
    parallel = scores(2)
    assert torch.get_num_threads() == 3
    assert {name.split("_")[0] for name, _ in seen} == {"cst-score"} and {n for _, n in seen} == {1}
    assert single.keys() == parallel.keys()
    for k, (p, fg) in single.items():
        assert p == parallel[k][0] and np.array_equal(fg, parallel[k][1])


def test_prefetch_workers_stop_at_the_first_error():
    """A batch that fails (an unreadable support mask) ends prefetch with its error; the batches not yet
    started are dropped instead of all being scored first (`Executor.map` cancels them when closed)."""
    import time

    import pandas as pd

    store = FakeStore(n=8)
    ids = list(store.data)
    episodes = pd.DataFrame(
        {
            "query_id": ids * 3,
            "support_classes": [[1]] * 24,
            "support_ids": [[[i]] for i in ids[1:] + ids[:1]] * 3,
        }
    )
    calls = []

    def support_mask(image_id: str, class_id: int) -> np.ndarray:
        calls.append(image_id)
        if image_id == ids[1]:
            raise FscsError(f"{image_id}: mask unreadable")
        time.sleep(0.05)
        return np.ones((16, 16), dtype=bool)

    pred = CSTPredictor(CST(tiny_config()), TokenBank(store), support_mask, batch_size=1, workers=2)
    with pytest.raises(FscsError, match=f"{ids[1]}: mask unreadable"):
        pred.prefetch(episodes, progress=False)
    assert len(calls) <= 6  # of 8 batches (one query each), sorted: the failing one comes first


@pytest.mark.parametrize("size, out", [(4, 2), (6, 3), (6, 4)])
def test_pooling_weights_equal_pooling_the_correlation_and_the_support(size, out):
    from fscs.learn.model.correlation import correlate, prepare_query, prepare_support
    from fscs.learn.model.cst import pooling_weights

    q = prepare_query(tokens(2).float(), H)
    s = prepare_support(tokens(2, 1).float(), G, H, size)
    x = correlate(q, s)
    direct = pool_support(x.permute(0, 2, 3, 1), out)
    by_matrix = torch.matmul(x, pooling_weights(x.shape[-1], out).T).permute(0, 2, 3, 1)
    assert by_matrix.shape == (2, G[0] * G[1], 1 + out * out, L * H)
    torch.testing.assert_close(direct, by_matrix, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(by_matrix[..., 0, :], x.permute(0, 2, 3, 1)[..., 0, :])  # CLS kept as is
    pooled_support = torch.matmul(pooling_weights(s.shape[2], out), s)  # what CST computes: linear, so equal
    torch.testing.assert_close(direct, correlate(q, pooled_support).permute(0, 2, 3, 1), atol=1e-6, rtol=1e-5)


def test_single_query_broadcast_matches_repeated_query():
    torch.manual_seed(0)
    model = CST(tiny_config()).eval()
    q = model.prepare_query(tokens(1))
    s = model.prepare_support(tokens(3, 1))
    mask = torch.ones(3, 4, 4)
    with torch.no_grad():
        a = model.forward_prepared(q, s, mask)
        b = model.forward_prepared(q.expand(3, -1, -1, -1).contiguous(), s, mask)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
