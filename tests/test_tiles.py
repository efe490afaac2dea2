"""The generator's tiled product kernel against numpy, on every row tail, odd sizes, strided
views and accumulation; padding and packing."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from dwave.tiles import WIDTH, matmul, pack, pad_blocks, padded


@numba.njit
def product(a, packed, out, accumulate):
    matmul(a, packed, out, accumulate)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9, 32])
@pytest.mark.parametrize("k, n", [(1, 16), (37, 48), (128, 128)])
def test_matmul_equals_numpy_on_strided_views(rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    wide = rng.standard_normal((rows, k + 5)).astype(np.float32)  # a: a view, row stride k + 5
    a = wide[:, 3:3 + k]
    out_wide = np.full((rows, n + 16), 7.0, np.float32)
    out = out_wide[:, 16:]
    product(a, pack(w), out, False)
    expected = a.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4 * np.sqrt(k))
    assert (out_wide[:, :16] == 7.0).all()  # nothing written outside the view
    product(a, pack(w), out, True)  # out += a @ w
    np.testing.assert_allclose(out, 2 * expected, rtol=1e-5, atol=2e-4 * np.sqrt(k))


def test_a_row_does_not_depend_on_the_rows_around_it():
    """Bit for bit: a song's numbers must not change with its batch or its place in it."""
    rng = np.random.default_rng(0)
    w = pack(rng.standard_normal((300, 32)).astype(np.float32))
    a = rng.standard_normal((11, 300)).astype(np.float32)
    together = np.empty((11, 32), np.float32)
    product(a, w, together, False)
    for r in range(11):
        alone = np.empty((1, 32), np.float32)
        product(a[r:r + 1], w, alone, False)
        assert np.array_equal(alone[0], together[r])


def test_pad_blocks_pads_each_block_and_pack_makes_panels():
    w = np.arange(2 * 3 * 2 * 5, dtype=np.float32).reshape(2 * 3, 2 * 5)  # 2 x 2 blocks of 3 x 5
    p = pad_blocks(w, 3, 5)
    assert p.shape == (2 * padded(3), 2 * padded(5)) == (32, 32)
    np.testing.assert_array_equal(p[16:19, 16:21], w[3:6, 5:10])
    np.testing.assert_array_equal(p[0:3, 0:5], w[0:3, 0:5])
    assert p.sum() == w.sum()  # the rest is zeros
    assert pad_blocks(w, None, 5).shape == (6, 32)
    packed = pack(p)
    assert packed.shape == (32 // WIDTH, 32, WIDTH)
    np.testing.assert_array_equal(packed[1, :, 3], p[:, WIDTH + 3])
