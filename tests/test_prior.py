"""The masked-prototype prior map (``train.model.prior: prototype``): its values, and that the model, the
predictor and checkpoints carry it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fscs.core.errors import FscsError
from fscs.learn.model import CST, load_checkpoint, save_checkpoint
from fscs.learn.model.prior import prepare_prior, prototype_prior
from tests.test_model import FakeStore, G, make_predictor, tiny_config, tokens


def unit(v: torch.Tensor) -> torch.Tensor:
    return F.normalize(v, dim=-1)


def test_prior_is_the_cosine_with_the_masked_prototype():
    g = torch.Generator().manual_seed(0)
    d, p = 8, G[0] * G[1]
    support = unit(torch.randn(1, p, d, generator=g))
    query = unit(torch.randn(1, p, d, generator=g))
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :4] = True  # token cells (0..1, 0..1) of the 4x4 grid, whole
    cells = [0, 1, 4, 5]
    proto = unit(support[0, cells].mean(0))
    query[0, 7] = proto  # one query token equals the prototype: cosine 1, the map's maximum
    prior = prototype_prior(query, support, mask, G)
    assert prior.shape == (1, 2, *G)
    torch.testing.assert_close(prior[0, 0].flatten(), query[0] @ proto, atol=1e-6, rtol=1e-6)
    assert prior[0, 0].flatten()[7] == pytest.approx(1.0, abs=1e-6)
    scaled = prior[0, 1].flatten()
    assert scaled.min() == pytest.approx(0.0) and scaled[7] == pytest.approx(1.0)


def test_prior_weights_are_area_fractions_and_an_empty_mask_uses_every_patch():
    g = torch.Generator().manual_seed(1)
    support = unit(torch.randn(2, 16, 4, generator=g))
    query = unit(torch.randn(1, 16, 4, generator=g))
    half = torch.zeros(2, 8, 8, dtype=torch.bool)
    half[:, 0, 0:2] = True  # a quarter of token cell 0 only
    empty = torch.zeros(2, 8, 8, dtype=torch.bool)
    a = prototype_prior(query, support, half, G)
    torch.testing.assert_close(a[:, 0].flatten(1), (query @ support[:, 0:1].transpose(1, 2)).squeeze(-1))
    b = prototype_prior(query, support, empty, G)
    full = prototype_prior(query, support, torch.ones(2, 8, 8, dtype=torch.bool), G)
    torch.testing.assert_close(b, full)
    assert torch.isfinite(b).all()


def test_prepare_prior_takes_one_stored_layer():
    t = tokens(2)
    out = prepare_prior(t, -1)
    assert out.shape == (2, G[0] * G[1], t.shape[-1])
    torch.testing.assert_close(out, unit(t[:, -1, 1:].float()))


def test_model_with_prior_needs_it_and_matches_the_raw_token_path():
    torch.manual_seed(0)
    model = CST(tiny_config(prior="prototype")).eval()
    plain = CST(tiny_config())
    assert model.uses_prior and not plain.uses_prior
    # two prior channels in both heads' first layer, nothing else
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    c2 = model.config.channels[1]
    assert extra == 2 * c2 + 2 * c2 * 9
    q, s = tokens(3), tokens(3, 1)
    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[:, 2:6, 2:6] = True
    qp, sp = model.prepare_query(q), model.prepare_support(s)
    with pytest.raises(ValueError, match="prototype' prior"):
        model.forward_prepared(qp, sp, mask)
    with torch.no_grad():
        direct = model(q, s, mask)
        prepared = model.forward_prepared(qp, sp, mask, (model.prepare_prior(q), model.prepare_prior(s)))
        other_mask = model(q, s, ~mask)
    for x, y in zip(direct, prepared, strict=True):
        torch.testing.assert_close(x, y)
    assert not torch.allclose(direct[1], other_mask[1])  # the prior follows the support mask


def test_predictor_and_checkpoint_carry_the_prior(tmp_path):
    torch.manual_seed(0)
    model = CST(tiny_config(prior="prototype"))
    store = FakeStore()
    p, fg = make_predictor(model, store).predict("img0", [3], [["img1"]])
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["config"]["prior"] == "prototype" and loaded.uses_prior
    p2, fg2 = make_predictor(loaded, store).predict("img0", [3], [["img1"]])
    np.testing.assert_allclose(p2, p, rtol=1e-6)
    np.testing.assert_allclose(fg2, fg, rtol=1e-5, atol=1e-7)


def test_unknown_prior_and_a_prior_layer_the_store_lacks_are_refused():
    with pytest.raises(ValueError, match="prior must be one of"):
        CST(tiny_config(prior="pfenet"))
    with pytest.raises(
        FscsError, match=r"train.model.prior_layer = 2 is not one of the feature store's 2 layers"
    ):
        CST(tiny_config(prior="prototype", prior_layer=2))
    CST(tiny_config(prior="prototype", prior_layer=-2))  # counted from the last, as a list index
    CST(tiny_config(prior_layer=5))  # no prior map: the layer is not used
