"""Momentum, Nesterov, weight decay and the schedules against their textbook formulas.

Two levels: the update alone against the formulas written directly in numpy
(same gradients, so the same bits), and training a tiny network step by step
against an independent numpy implementation: its own backprop and the update
as the texts write it (Sutskever et al. 2013's velocity, Nielsen's weight
decay, Goyal et al. 2017 for a changing rate).
"""

import math

import numpy as np
import pytest

from distnn import model, optim
from distnn.config import Config
from distnn.exact import ExactGradients
from distnn.schedule import Schedule
from distnn.state import N_STATS
from distnn.step import train_step

SHAPES = [(6, 4), (4, 3)]


def random_params(dtype, seed):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=s).astype(dtype), rng.normal(size=s[1]).astype(dtype)) for s in SHAPES]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum, nesterov, decay", [(0.0, False, 0.0), (0.0, False, 0.01),
                                                       (0.9, False, 0.0), (0.9, True, 0.0),
                                                       (0.95, True, 1e-3), (0.5, False, 0.1)])
def test_the_update_is_the_formula_bit_for_bit(dtype, momentum, nesterov, decay):
    params, expected = random_params(dtype, 1), random_params(dtype, 1)
    velocity = optim.zero_velocity(params, momentum)
    v_expected = [[np.zeros_like(a) for a in layer] for layer in expected]
    mu, lam = dtype(momentum), dtype(decay)
    for step in range(5):
        rate = dtype(0.3 / (step + 1))
        grads = random_params(dtype, 10 + step)
        for (w, b), (gw, gb), v in zip(expected, grads, v_expected):
            for k, (p, g) in enumerate(((w, gw), (b, gb))):
                d = g + lam * p if k == 0 else g   # biases are not decayed
                v[k] = mu * v[k] + d
                p -= rate * ((d + mu * v[k]) if nesterov else v[k] if momentum else d)
        optim.update(params, [tuple(g.copy() for g in layer) for layer in grads], velocity,
                     0.3 / (step + 1), momentum, nesterov, decay)
        for (w, b), (w2, b2) in zip(params, expected):
            assert w.dtype == dtype and np.array_equal(w, w2) and np.array_equal(b, b2)
    assert len(velocity) == (2 if momentum else 0)


# the independent side: plain numpy backprop of a sigmoid/softmax network

def textbook_gradients(params, X, labels, decay):
    """Gradients of the mean cross-entropy plus decay/2 * sum(w**2) (weights only)."""
    (W0, b0), (W1, b1) = params
    a1 = 1 / (1 + np.exp(-(X @ W0 + b0)))
    z = a1 @ W1 + b1
    y = np.exp(z - z.max(axis=1, keepdims=True))
    y /= y.sum(axis=1, keepdims=True)
    delta = (y - np.eye(10)[labels]) / len(X)
    delta1 = (delta @ W1.T) * a1 * (1 - a1)
    return [(X.T @ delta1 + decay * W0, delta1.sum(axis=0)),
            (a1.T @ delta + decay * W1, delta.sum(axis=0))]


def tiny_problem(seed=3, rows=24, hidden=5):
    rng = np.random.default_rng(seed)
    pixels = np.where(rng.random((rows, 784)) < 0.3, rng.integers(0, 256, (rows, 784)), 0)
    labels = rng.integers(0, 10, rows)
    params = model.init_params((784, hidden, 10), seed, "sigmoid", np.float64)
    return pixels.astype(np.uint8), labels, params


def distnn_steps(params, pixels, labels, steps, rates, **settings):
    """``steps`` steps of distnn's training step (one process), parameters after each."""
    cfg = Config(layers=(784, params[0][0].shape[1], 10), dtype="float64", **settings)
    reducer = ExactGradients(cfg.layers, N_STATS)
    T = model.targets_for(labels, len(labels), 10, np.float64)
    columns = np.flatnonzero(pixels.any(axis=0))
    params = [(W.copy(), b.copy()) for W, b in params]
    velocity = optim.zero_velocity(params, cfg.momentum)
    trajectory = []
    for t in range(steps):
        train_step(params, velocity, rates(t), cfg, pixels, T, columns, reducer, len(labels))
        trajectory.append([(W.copy(), b.copy()) for W, b in params])
    return trajectory


def assert_close(got, want):
    """Equal to what rounding allows: the exact sums keep about 23 bits of each factor of a
    deeper layer's weight gradient (:mod:`distnn.exact`), so gradients agree to ~1e-7, far
    closer than any mistake in a formula would leave them (a Nesterov term or a decay
    factor moves a step by ~1e-2)."""
    for (W, b), (W2, b2) in zip(got, want):
        np.testing.assert_allclose(W, W2, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b, b2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum, decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.01), (0.0, 0.05)])
def test_heavy_ball_and_weight_decay_follow_the_classic_update(momentum, decay):
    """Nielsen / Sutskever: v = mu*v - eta*grad C;  w = w + v, with C's L2 term in grad C."""
    pixels, labels, params = tiny_problem()
    eta, X = 0.7, pixels / 255.0
    ours = distnn_steps(params, pixels, labels, 12, lambda t: eta, momentum=momentum,
                        weight_decay=decay)
    theta = [[a.copy() for a in layer] for layer in params]
    v = [[np.zeros_like(a) for a in layer] for layer in params]
    for t in range(12):
        grads = textbook_gradients(theta, X, labels, decay)
        for layer, vel, g in zip(theta, v, grads):
            for k in range(2):
                vel[k] = momentum * vel[k] - eta * g[k]
                layer[k] = layer[k] + vel[k]
        assert_close(ours[t], theta)


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_nesterov_follows_sutskever_et_al(decay):
    """v = mu*v - eta*grad C(theta + mu*v);  theta = theta + v. distnn keeps the look-ahead
    point theta + mu*v as its parameters (the form PyTorch uses), so that is compared."""
    pixels, labels, params = tiny_problem(seed=4)
    eta, mu, X = 0.5, 0.9, pixels / 255.0
    ours = distnn_steps(params, pixels, labels, 12, lambda t: eta, momentum=mu, nesterov=True,
                        weight_decay=decay)
    theta = [[a.copy() for a in layer] for layer in params]
    v = [[np.zeros_like(a) for a in layer] for layer in params]
    for t in range(12):
        ahead = [[p + mu * q for p, q in zip(layer, vel)] for layer, vel in zip(theta, v)]
        grads = textbook_gradients(ahead, X, labels, decay)
        for layer, vel, g in zip(theta, v, grads):
            for k in range(2):
                vel[k] = mu * vel[k] - eta * g[k]
                layer[k] = layer[k] + vel[k]
        assert_close(ours[t], [[p + mu * q for p, q in zip(layer, vel)]
                               for layer, vel in zip(theta, v)])


SCHEDULES = {
    "constant": (dict(schedule="constant", warmup=0.5), lambda t: 0.6 * min(1, (t + 1) / 4)),
    "step": (dict(schedule="step", decay_every=0.375, decay_factor=0.5, warmup=0),
             lambda t: 0.6 * 0.5 ** (t // 3)),
    "cosine": (dict(schedule="cosine", warmup=0.25),
               lambda t: 0.6 * 0.5 * (1 + math.cos(math.pi * t / 16)) * min(1, (t + 1) / 2)),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedules_with_momentum_follow_goyal_et_al(name):
    """With a changing rate: v = mu*v + grad C;  w = w - eta_t * v (Goyal et al. 2017,
    eqs. 9-10), eta_t from the textbook formula with math.cos."""
    settings, textbook_rate = SCHEDULES[name]
    cfg = Config(lr=0.6, epochs=2, momentum=0.9, **settings)
    schedule = Schedule.of(cfg, steps_per_epoch=8)
    for t in range(16):
        assert schedule.rate(t) == pytest.approx(textbook_rate(t), rel=1e-14)
    pixels, labels, params = tiny_problem(seed=5)
    X = pixels / 255.0
    ours = distnn_steps(params, pixels, labels, 16, schedule.rate, momentum=0.9, **settings)
    w = [[a.copy() for a in layer] for layer in params]
    v = [[np.zeros_like(a) for a in layer] for layer in params]
    for t in range(16):
        grads = textbook_gradients(w, X, labels, 0.0)
        for layer, vel, g in zip(w, v, grads):
            for k in range(2):
                vel[k] = 0.9 * vel[k] + g[k]
                layer[k] = layer[k] - textbook_rate(t) * vel[k]
        assert_close(ours[t], w)
