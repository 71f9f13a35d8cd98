"""distnn.step in one process: a step's bits do not depend on the order of its rows,
skipped pixel columns are exactly untouched, and a step is its gradient plus the update."""

import numpy as np
import pytest

from distnn import model, optim
from distnn.config import Config
from distnn.exact import ExactGradients
from distnn.state import N_STATS
from distnn.step import gradients, mean_gradients, train_step

CFG = Config(layers=(784, 12, 10), dtype="float32", momentum=0.9, nesterov=True,
             weight_decay=1e-3)


def batch(seed=0, rows=24):
    rng = np.random.default_rng(seed)
    pixels = np.where(rng.random((rows, 784)) < 0.2, rng.integers(1, 256, (rows, 784)), 0)
    pixels[:, :100] = 0  # columns empty in every row: skipped by the step
    labels = rng.integers(0, 10, rows)
    return pixels.astype(np.uint8), model.targets_for(labels, rows, 10, np.float32)


def params():
    return model.init_params(CFG.layers, 0, CFG.activation, np.float32)


def step_gradients(pixels, T, p=None):
    columns = np.flatnonzero(pixels.any(axis=0))
    reducer = ExactGradients(CFG.layers, N_STATS)
    return gradients(p or params(), CFG, pixels, T, columns, reducer, len(pixels))


def test_gradients_do_not_depend_on_the_order_of_the_rows():
    pixels, T = batch()
    grads, stats = step_gradients(pixels, T)
    order = np.random.default_rng(1).permutation(len(pixels))
    grads2, stats2 = step_gradients(pixels[order], T[order])
    for (gW, gb), (gW2, gb2) in zip(grads, grads2):
        assert gW.dtype == np.float32 and np.array_equal(gW, gW2) and np.array_equal(gb, gb2)
    assert np.array_equal(stats, stats2) and stats[1] <= len(pixels)


def test_empty_pixel_columns_have_exactly_zero_gradient():
    pixels, T = batch()
    (gW0, _), _ = step_gradients(pixels, T)[0]
    assert not gW0[:100].any() and gW0[100:].any()


def test_a_step_is_its_gradient_then_the_update():
    pixels, T = batch(2)
    p, q = params(), params()
    vp, vq = optim.zero_velocity(p, CFG.momentum), optim.zero_velocity(q, CFG.momentum)
    columns = np.flatnonzero(pixels.any(axis=0))
    reducer = ExactGradients(CFG.layers, N_STATS)
    for rate in (0.1, 0.3):
        train_step(p, vp, rate, CFG, pixels, T, columns, reducer, len(pixels))
        grads, _ = step_gradients(pixels, T, q)
        optim.update(q, grads, vq, rate, CFG.momentum, CFG.nesterov, CFG.weight_decay)
    for (W, b), (W2, b2) in zip(p + vp, q + vq):
        assert np.array_equal(W, W2) and np.array_equal(b, b2)


@pytest.mark.parametrize("rows", [1, 7])
def test_a_rows_outputs_do_not_depend_on_the_rows_beside_it(rows):
    pixels, _ = batch(3, rows=20)
    together = model.output_values(params(), pixels, CFG.activation, CFG.loss)
    for i in range(0, 20, rows):
        alone = model.output_values(params(), pixels[i:i + rows], CFG.activation, CFG.loss)
        assert np.array_equal(alone, together[i:i + rows])


def test_mean_gradients_round_the_exact_sums_once_into_the_parameters_dtype():
    p = params()
    columns = np.array([3, 100, 783])
    rng = np.random.default_rng(4)
    sums = [(rng.normal(size=(3, 12)) * 1e3, rng.normal(size=12)),
            (rng.normal(size=(12, 10)), rng.normal(size=10))]
    grads = mean_gradients([(w.copy(), b.copy()) for w, b in sums], p, columns, 24)
    gW0 = grads[0][0]
    assert gW0.shape == (784, 12) and gW0.dtype == np.float32
    assert np.array_equal(gW0[columns], (sums[0][0] * ((1 / 255) / 24)).astype(np.float32))
    assert not np.delete(gW0, columns, axis=0).any()  # unused pixel columns: exactly 0
    for (gW, gb), (sW, sb) in zip(grads[1:], sums[1:]):
        assert np.array_equal(gW, (sW * (1 / 24)).astype(np.float32))
        assert np.array_equal(gb, (sb * (1 / 24)).astype(np.float32))
