"""The resizers of fscs.core.resample, each against an independent reference (torch or exact arithmetic)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fscs.core.errors import FscsError
from fscs.core.resample import bilinear, bilinear_gather, nearest, nearest_torch, size_hw

RNG = np.random.default_rng(0)
SIZES = [((16, 16), (213, 320)), ((4, 4), (8, 8)), ((8, 8), (5, 7)), ((1, 1), (3, 2)), ((7, 3), (64, 64))]


def _torch_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear", align_corners=False)[
        0
    ].numpy()


@pytest.mark.parametrize("shape, size", SIZES)
def test_bilinear_is_torch_bilinear(shape, size):
    x = RNG.random((2, *shape)).astype(np.float32)
    assert np.array_equal(bilinear(x, size), _torch_bilinear(x, size))
    assert np.array_equal(bilinear(x[0], size), _torch_bilinear(x[:1], size)[0])
    with pytest.raises(FscsError, match="bilinear: expected"):
        bilinear(np.zeros(4), 8)


@pytest.mark.parametrize("shape, size", SIZES)
def test_bilinear_gather_matches_torch_within_1e5(shape, size):
    x = RNG.random((2, *shape)).astype(np.float32)
    np.testing.assert_allclose(bilinear_gather(x, size), _torch_bilinear(x, size), atol=1e-5)
    assert bilinear_gather(x, shape) is x  # already that size: returned as is


@pytest.mark.parametrize("shape, size", [((24, 32), 7), ((5, 3), (41, 2)), ((2, 2), 41), ((213, 320), 64)])
def test_nearest_torch_is_torch_nearest_exact(shape, size):
    m = RNG.integers(0, 256, shape, dtype=np.uint8)
    ref = F.interpolate(torch.from_numpy(m)[None, None], size=size_hw(size), mode="nearest-exact")[0, 0]
    assert np.array_equal(nearest_torch(m, size), ref.numpy())


@pytest.mark.parametrize(
    "shape, size", [((24, 32), 7), ((5, 3), (41, 2)), ((2, 2), 41), ((9, 11, 3), (20, 4))]
)
def test_nearest_samples_pixel_centres_exactly(shape, size):
    a = RNG.integers(0, 256, shape, dtype=np.uint8)
    h, w = size_hw(size)

    def src(i: int, n_in: int, n_out: int) -> int:
        return min(int((Fraction(2 * i + 1, 2) * n_in) // n_out), n_in - 1)

    ref = a[[src(i, shape[0], h) for i in range(h)]][:, [src(j, shape[1], w) for j in range(w)]]
    assert np.array_equal(nearest(a, size), ref)


def test_the_two_nearest_resizers_differ_at_exact_ties():
    # 2 -> 41 rows: row 20 samples source position exactly 1.0; torch's float32 scale lands just below it
    m = np.array([[0], [1]], dtype=np.uint8)
    assert nearest(m, (41, 1))[20, 0] == 1 and nearest_torch(m, (41, 1))[20, 0] == 0
