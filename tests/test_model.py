"""The hand-written MLP: the worked 2-2-2 example, finite differences, stability, bad input."""

import h5py
import numpy as np
import pytest

from distnn import activations, losses, model

# Section 2.3 of the source report: the "Neural Network" column (exact in float64).
WORKED_EXPECTED = {
    "w1": 0.09999287608226642, "w2": 0.19998891676306169, "w3": 0.09998921557833007,
    "w4": 0.0999985689813837, "w5": 0.09930886197388886, "w6": 0.09917137885954593,
    "w7": 0.09930570520953383, "w8": 0.19916741399056967, "w9": 0.09992876082266425,
    "w10": 0.09988916763061688, "w11": 0.09872792707492782, "w12": 0.09841131755925499,
}


def test_worked_example_one_step_matches_report():
    # net_h1 = w1 i1 + w3 i2 + w9, net_h2 = w2 i1 + w4 i2 + w10 -> W0 = [[w1, w2], [w3, w4]]
    params = [(np.array([[0.1, 0.2], [0.1, 0.1]]), np.array([0.1, 0.1])),
              (np.array([[0.1, 0.1], [0.1, 0.2]]), np.array([0.1, 0.1]))]
    X = np.array([[0.1, 0.1], [0.1, 0.2]])
    T = np.array([[1.0, 0.0], [0.0, 1.0]])
    loss, grads = model.loss_and_grads(params, X, T, activation="sigmoid", loss="mse")
    (W0, b0), (W1, b1) = model.sgd_step(params, grads, 0.1)
    got = {"w1": W0[0, 0], "w2": W0[0, 1], "w3": W0[1, 0], "w4": W0[1, 1],
           "w5": W1[0, 0], "w6": W1[0, 1], "w7": W1[1, 0], "w8": W1[1, 1],
           "w9": b0[0], "w10": b0[1], "w11": b1[0], "w12": b1[1]}
    for name, expected in WORKED_EXPECTED.items():
        assert abs(got[name] - expected) <= 1e-15, (name, got[name], expected)
    # sample 1's total error is 0.2599665478 and sample 2's 0.24682275692936534 in the report
    assert loss == pytest.approx((0.2599665478 + 0.24682275692936534) / 2, abs=1e-10)


def numeric_grads(params, X, T, activation, loss, eps=1e-6):
    """Central differences of the mean loss, one parameter at a time."""
    out = []
    for W, b in params:
        pair = []
        for p in (W, b):
            g = np.zeros_like(p)
            for idx in np.ndindex(p.shape):
                old = p[idx]
                p[idx] = old + eps
                up = model.loss_and_grads(params, X, T, activation, loss)[0]
                p[idx] = old - eps
                down = model.loss_and_grads(params, X, T, activation, loss)[0]
                p[idx] = old
                g[idx] = (up - down) / (2 * eps)
            pair.append(g)
        out.append(tuple(pair))
    return out


@pytest.mark.parametrize("loss", losses.LOSSES)
@pytest.mark.parametrize("activation", list(activations.ACTIVATIONS))
@pytest.mark.parametrize("hidden", [[5], [4, 6, 3]])
def test_gradients_match_finite_differences(activation, loss, hidden):
    rng = np.random.default_rng(7)
    layers = [4, *hidden, 3]
    params = model.init_params(layers, seed=3, activation=activation, dtype=np.float64)
    params = [(W, b + rng.normal(0, 0.1, b.shape)) for W, b in params]
    X = rng.normal(0, 1, (6, 4))
    T = np.eye(3)[rng.integers(0, 3, 6)] if loss == "ce" else rng.uniform(0, 1, (6, 3))
    _, grads = model.loss_and_grads(params, X, T, activation, loss)
    for (gW, gb), (nW, nb) in zip(grads, numeric_grads(params, X, T, activation, loss)):
        np.testing.assert_allclose(gW, nW, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(gb, nb, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", list(activations.ACTIVATIONS))
def test_activation_derivatives_match_finite_differences(name):
    f, f_grad = activations.get(name)
    z = np.linspace(-3, 3, 61) + 0.013  # avoid the kink at 0
    eps = 1e-6
    numeric = (f(z + eps) - f(z - eps)) / (2 * eps)
    np.testing.assert_allclose(f_grad(z, f(z)), numeric, rtol=1e-6, atol=1e-9)


def test_numerically_safe_for_huge_logits():
    z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]])
    t = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = activations.sigmoid(np.array([1e4, -1e4]))
        assert s[0] == 1.0 and s[1] == 0.0
        for loss in losses.LOSSES:
            y = losses.output(loss, z)
            value = losses.per_sample_loss(loss, z, y, t)
            delta = losses.output_delta(loss, z, y, t)
            assert np.all(np.isfinite(y)) and np.all(np.isfinite(value)) and np.all(np.isfinite(delta))
        assert losses.per_sample_loss("ce", z, losses.softmax(z), t)[0] == pytest.approx(2e4)
        _, quadratic, cross = model.metric_sums(losses.softmax(z), t)
        assert np.all(np.isfinite(cross)) and np.all(np.isfinite(quadratic))


def test_float32_and_float64_paths():
    for dtype in (np.float32, np.float64):
        params = model.init_params([6, 5, 3], seed=1, dtype=dtype)
        X = np.random.default_rng(0).uniform(0, 1, (4, 6))
        loss, grads = model.loss_and_grads(params, X, np.array([0, 1, 2, 0]))
        assert all(g.dtype == dtype for pair in grads for g in pair)
        assert all(p.dtype == dtype for pair in model.sgd_step(params, grads, 0.1) for p in pair)
        assert model.forward(params, X).dtype == dtype
        assert np.isfinite(loss)


def test_init_is_seeded_and_scaled_for_the_activation():
    a = model.init_params([784, 256, 10], seed=5)
    b = model.init_params([784, 256, 10], seed=5)
    c = model.init_params([784, 256, 10], seed=6)
    assert all(np.array_equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))
    assert not np.array_equal(a[0][0], c[0][0])
    glorot_limit = np.sqrt(6 / (784 + 256))
    assert np.abs(a[0][0]).max() <= glorot_limit
    assert a[0][0].std() == pytest.approx(glorot_limit / np.sqrt(3), rel=0.02)
    he = model.init_params([784, 256, 10], seed=5, activation="relu")
    assert he[0][0].std() == pytest.approx(np.sqrt(2 / 784), rel=0.02)
    assert np.array_equal(model.init_params([3, 2], dtype=np.float64)[0][0].astype(np.float32),
                          model.init_params([3, 2], dtype=np.float32)[0][0])


def test_metrics_against_direct_formulas():
    params = model.init_params([5, 4, 3], seed=2, dtype=np.float64)
    X = np.random.default_rng(1).uniform(0, 1, (8, 5))
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    m = model.metrics(params, X, labels)
    y = model.forward(params, X)
    t = np.eye(3)[labels]
    assert m["accuracy"] == np.mean(y.argmax(1) == labels)
    assert m["quadratic_cost"] == pytest.approx(np.mean(0.5 * np.sum((t - y) ** 2, axis=1)))
    assert m["cross_entropy"] == pytest.approx(
        np.mean(-np.sum(t * np.log(y) + (1 - t) * np.log(1 - y), axis=1)))


def test_short_training_on_real_mnist_beats_chance(mnist_h5):
    """784-32-10 on 2,000 real images, 8 epochs: at least 80% on 1,000 test images.

    Chance is 10%; this seeded run reaches 86.9% here. The 80% bar leaves room
    for other BLAS builds while failing a model that does not learn (a wrong
    weight gradient or update); gradient details are the finite-difference
    tests' job.
    """
    with h5py.File(mnist_h5, "r") as f:
        X = f["train/images"][:2000] / np.float32(255)
        y = f["train/labels"][:2000].astype(np.int64)
        Xt = f["test/images"][:1000] / np.float32(255)
        yt = f["test/labels"][:1000].astype(np.int64)
    params = model.init_params([784, 32, 10], seed=0)
    before = model.metrics(params, Xt, yt)["accuracy"]
    rng = np.random.default_rng(0)
    for _ in range(8):
        order = rng.permutation(len(X))
        for start in range(0, len(X), 20):
            batch = order[start:start + 20]
            _, grads = model.loss_and_grads(params, X[batch], y[batch])
            params = model.sgd_step(params, grads, 0.5)
    after = model.metrics(params, Xt, yt)
    assert before < 0.25
    assert after["accuracy"] >= 0.80, after


@pytest.mark.parametrize("call, message", [
    (lambda p: model.forward(p, np.zeros((3, 5))), r"X: shape \(3, 5\), expected \(N, 4\)"),
    (lambda p: model.loss_and_grads(p, np.zeros((3, 4)), np.array([0, 1])), "2 labels for 3 samples"),
    (lambda p: model.loss_and_grads(p, np.zeros((2, 4)), np.array([0, 3])), "label 3 is outside the output range 0..2"),
    (lambda p: model.loss_and_grads(p, np.zeros((2, 4)), np.array([-1, 0])), "label -1 is outside"),
    (lambda p: model.loss_and_grads(p, np.zeros((2, 4)), np.zeros((2, 2))), r"shape \(2, 2\)"),
    (lambda p: model.forward(p, np.full((2, 4), np.nan)), "X: contains NaN or infinity"),
    (lambda p: model.loss_and_grads(p, np.zeros((0, 4)), np.zeros(0, int)), "X: empty batch"),
    (lambda p: model.loss_and_grads(p, np.zeros((1, 4)), np.array([[np.inf, 0, 0]])), "targets: contain NaN"),
    (lambda p: model.forward(p, np.zeros((2, 4)), activation="swish"), "unknown activation 'swish'"),
    (lambda p: model.forward(p, np.zeros((2, 4)), loss="hinge"), "unknown loss 'hinge'"),
    (lambda p: model.init_params([4], seed=0), "at least two positive widths"),
    (lambda p: model.init_params([4, 2], dtype=np.int32), "int32 is not supported"),
    (lambda p: model.forward([p[0], p[0]], np.zeros((2, 4))), "do not chain"),
])
def test_bad_input_raises_value_error(call, message):
    params = model.init_params([4, 5, 3], seed=0)
    with pytest.raises(ValueError, match=message):
        call(params)
