"""distnn.exact: sums whose bits do not depend on the order or grouping of the rows."""

import math

import numpy as np
import pytest

from distnn.exact import (EMPTY, ExactGradients, ExactSum, NonFiniteError, exponent,
                          headroom_bits, off_grid, on_grid)


def rows(seed, n, width, spread=30):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, width)) * 2.0 ** rng.integers(-spread, spread, size=(n, 1))


def test_headroom_and_exponents():
    assert headroom_bits(1) == 52 and headroom_bits(256) == 44 and headroom_bits(257) == 43
    assert exponent(np.array([0.75, -1.0])) == 1 and exponent(np.zeros(3)) == EMPTY
    with pytest.raises(NonFiniteError):
        exponent(np.array([1.0, np.nan]))


def test_grid_round_trip_is_exact_for_values_on_the_grid():
    x = np.array([3.0, -5.5, 0.25])
    assert np.array_equal(off_grid(on_grid(x, 2), 2), x)
    assert np.array_equal(on_grid(np.array([0.3]), 1), [1.0])  # rint(0.6)


def test_column_sums_ignore_row_order_and_match_fsum_to_the_grid():
    parts = rows(1, 200, 5)
    reducer = ExactSum([5])
    [total] = reducer([parts], len(parts))
    [shuffled] = reducer([parts[np.random.default_rng(2).permutation(200)]], len(parts))
    assert np.array_equal(total, shuffled)
    bits = headroom_bits(200)
    for k in range(5):  # each value rounded to the grid below the largest, then summed exactly
        reference = math.fsum(parts[:, k])
        assert abs(total[k] - reference) <= 200 * 2.0 ** (exponent(parts) - bits)


def test_gradients_are_the_same_bits_for_any_row_order():
    rng = np.random.default_rng(3)
    layers, n = (784, 6, 10), 40
    pixels = rng.integers(0, 256, (n, 784)).astype(np.float64)
    hidden, deltas = rng.random((n, 6)), [rows(4, n, 6, 8), rows(5, n, 10, 8)]
    stats = rng.random((n, 2))
    reducer = ExactGradients(layers, 2)

    def run(order):
        grads, sums = reducer([pixels[order], hidden[order]], [d[order] for d in deltas],
                              stats[order], n)
        return [g.copy() for pair in grads for g in pair], sums.copy()

    first, again = run(np.arange(n)), run(rng.permutation(n))
    for a, b in zip(first[0] + [first[1]], again[0] + [again[1]]):
        assert np.array_equal(a, b)
    # the first layer: sum_r a_r^T d_r over the integer pixels, to the grid's accuracy
    # (38 bits below the batch's largest delta)
    reference = pixels.T @ deltas[0]
    np.testing.assert_allclose(first[0][0], reference, rtol=0, atol=np.abs(reference).max() * 1e-8)


def test_a_nan_anywhere_is_reported():
    reducer = ExactSum([2])
    with pytest.raises(NonFiniteError):
        reducer([np.array([[1.0, np.inf]])], 1)
