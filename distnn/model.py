"""A multi-layer perceptron with hand-written backprop (numpy only).

Parameters are a list of ``(W, b)`` pairs, ``W`` shaped (fan_in, fan_out) and
``b`` shaped (fan_out,), so a layer computes ``z = a @ W + b``. Hidden layers
use one activation from :mod:`distnn.activations`; the output layer and loss
come as a pair from :mod:`distnn.losses`.

The public API (``init_params``, ``forward``, ``loss_and_grads``, ``sgd_step``,
``metrics``) works on a batch ``X`` of shape (N, fan_in). Every value has
fixed bits: the products are :func:`distnn.products.product`, the functions
:mod:`distnn.fixedmath`'s and the sums over rows taken in a fixed order, so
a row's outputs do not depend on the machine, the BLAS or the rows beside it.
The trainer uses ``forward_pass`` and ``layer_deltas`` on each rank's rows.
"""

import hashlib

import numpy as np

from distnn import activations, losses
from distnn.fixedmath import log, log1p, row_sum
from distnn.products import product
from distnn.rng import Stream

HE_INIT = ("relu", "leaky_relu", "elu")
CLIP = 1e-12  # keeps log() away from 0 in the cross-entropy metric
PIXEL_BITS = 8         # pixels are the integers 0..255 ...
PIXEL_SCALE = 1 / 255  # ... standing for their value times this: inputs in [0, 1]
EVAL_CHUNK = 2000      # rows evaluated at once (output_values): bounds memory; changes no bit


def init_params(layers, seed=0, activation="sigmoid", dtype=np.float32):
    """Seeded initial parameters for layer widths ``layers`` (e.g. [784, 256, 10]).

    Weights: He normal (std sqrt(2 / fan_in)) for relu-like activations, Glorot
    uniform (limit sqrt(6 / (fan_in + fan_out))) otherwise; biases zero. Values
    are drawn in float64 from the seed's raw random bits (:mod:`distnn.rng`)
    and then cast, so float32 and float64 runs start from the same numbers.
    """
    layers = check_layers(layers)
    activations.get(activation)
    dtype = check_dtype(dtype)
    stream = Stream(seed)
    params = []
    for fan_in, fan_out in zip(layers[:-1], layers[1:]):
        if activation in HE_INIT:
            W = stream.normal((fan_in, fan_out), np.sqrt(2.0 / fan_in))
        else:
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            W = stream.uniform_range(-limit, limit, (fan_in, fan_out))
        params.append((W.astype(dtype), np.zeros(fan_out, dtype=dtype)))
    return params


def layer_input(a, W, b, pixels=False):
    """``a @ W + b`` in W's dtype, its bits fixed. With ``pixels``, ``a`` holds the
    integers 0..255 and stands for them times PIXEL_SCALE."""
    if pixels:
        z = product(np.asarray(a, np.float64), W, W.dtype, integer_bits=PIXEL_BITS,
                    scale=PIXEL_SCALE)
    else:
        z = product(a, W, W.dtype)
    return np.add(z, b, out=np.empty(z.shape, W.dtype), dtype=np.float64, casting="unsafe")


def forward_pass(params, X, activation="sigmoid", loss="ce", pixels=False):
    """Run the network, keeping what backward needs.

    Returns (inputs, zs, y): ``inputs[l]`` is layer l's input, ``zs[l]`` its
    pre-activation, ``y`` the output values. With ``pixels``, ``X`` holds
    pixel values 0..255 for inputs in [0, 1] (:func:`layer_input`).
    """
    f, _ = activations.get(activation)
    inputs, zs = [], []
    a = X
    for i, (W, b) in enumerate(params):
        inputs.append(a)
        z = layer_input(a, W, b, pixels=pixels and i == 0)
        zs.append(z)
        a = f(z) if i < len(params) - 1 else losses.output(loss, z)
    return inputs, zs, a


def layer_deltas(params, inputs, zs, delta, activation="sigmoid"):
    """dLoss/dz of every layer, from the output layer's ``delta`` (rows, k) backwards."""
    _, f_grad = activations.get(activation)
    deltas = [delta]
    for i in range(len(params) - 1, 0, -1):
        W = params[i][0]
        slope = f_grad(zs[i - 1], inputs[i])
        delta = np.multiply(product(delta, W.T, W.dtype), slope, out=slope, dtype=np.float64,
                            casting="unsafe")
        deltas.insert(0, delta)
    return deltas


def backward(params, inputs, zs, delta, activation="sigmoid"):
    """Gradients summed over the rows of ``delta`` (dLoss/dz of the output layer).

    dW = input^T @ delta and db = sum of delta over rows, for every layer.
    """
    deltas = layer_deltas(params, inputs, zs, delta, activation)
    return [(product(a.T, d, d.dtype).astype(d.dtype, copy=False), row_sum(d.T))
            for a, d in zip(inputs, deltas)]


def forward(params, X, activation="sigmoid", loss="ce"):
    """Output values (probabilities for ``ce``), shape (N, K)."""
    X = check_inputs(params, X, activation, loss)
    return forward_pass(params, X, activation, loss)[2]


def output_values(params, images, activation, loss):
    """Output values for uint8 images (n, 784), EVAL_CHUNK rows at a time: each row's
    bits are its own, so evaluation and prediction give the same bits."""
    chunks = [forward_pass(params, images[i:i + EVAL_CHUNK], activation, loss,
                           pixels=True)[2] for i in range(0, len(images), EVAL_CHUNK)]
    return np.concatenate(chunks) if chunks else np.zeros((0, params[-1][0].shape[1]))


def task_labels(labels, positive_digit):
    """The labels of the task trained: the digits, or 1 for ``positive_digit`` and 0 for
    every other digit (one digit against the rest)."""
    return labels if positive_digit is None else (labels == positive_digit).astype(np.int64)


def targets_for(targets, n, k, dtype):
    """Float targets (n, k) from integer labels (n,) or a float array (n, k).

    Integer labels are one-hot encoded; with a single output (k = 1) they must
    be 0 or 1 and become that output's target.
    """
    t = np.asarray(targets)
    if t.ndim == 1:
        if t.shape[0] != n:
            raise ValueError(f"targets: {t.shape[0]} labels for {n} samples")
        if not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"targets: 1-d targets must be integer labels, got {t.dtype}")
        hi = 1 if k == 1 else k - 1
        if t.size and (t.min() < 0 or t.max() > hi):
            bad = t[(t < 0) | (t > hi)][0]
            raise ValueError(f"targets: label {bad} is outside the output range 0..{hi}")
        return (t[:, None] == 1).astype(dtype) if k == 1 else np.eye(k, dtype=dtype)[t]
    if t.shape != (n, k):
        raise ValueError(f"targets: shape {t.shape}, expected ({n},) labels or ({n}, {k})")
    if not np.all(np.isfinite(t)):
        raise ValueError("targets: contain NaN or infinity")
    return t.astype(dtype, copy=False)


def loss_and_grads(params, X, targets, activation="sigmoid", loss="ce"):
    """Mean loss over the batch and its gradients, shaped like ``params``."""
    X = check_inputs(params, X, activation, loss)
    T = targets_for(targets, X.shape[0], params[-1][0].shape[1], X.dtype)
    inputs, zs, y = forward_pass(params, X, activation, loss)
    n = X.shape[0]
    total = row_sum(losses.per_sample_loss(loss, zs[-1], y, T))
    delta = losses.output_delta(loss, zs[-1], y, T) / X.dtype.type(n)
    return float(total / n), backward(params, inputs, zs, delta, activation)


def sgd_step(params, grads, lr):
    """Plain SGD: ``p - lr * g`` for every parameter, in the parameters' dtype."""
    step = []
    for (W, b), (gW, gb) in zip(params, grads):
        rate = W.dtype.type(lr)
        step.append((W - rate * gW.astype(W.dtype, copy=False),
                      b - rate * gb.astype(b.dtype, copy=False)))
    return step


def metric_sums(y, t):
    """Per-sample correct (0/1), quadratic cost and cross-entropy cost, in float64.

    Accuracy uses argmax (threshold 0.5 for a single output). The costs are
    quadratic = 1/2 sum (t - y)^2 and cross-entropy = -sum [t ln y + (1 - t) ln(1 - y)],
    with y clipped to [1e-12, 1 - 1e-12]; sums over outputs are taken in order.
    """
    y = y.astype(np.float64)
    t = t.astype(np.float64)
    correct = is_correct(y, t)
    quadratic = 0.5 * row_sum((t - y) * (t - y))
    yc = np.clip(y, CLIP, 1 - CLIP)
    cross = -row_sum(t * log(yc) + (1 - t) * log1p(-yc))
    return correct.astype(np.float64), quadratic, cross


def guess(y):
    """The class each output picks: the argmax, or for a single output 1 at 0.5 and above."""
    if y.shape[-1] == 1:
        return (y[..., 0] >= 0.5).astype(np.int64)
    return y.argmax(axis=-1)


def is_correct(y, t):
    """Per sample: does the output pick the target's class?"""
    return guess(y) == guess(t)


def metrics(params, X, targets, activation="sigmoid", loss="ce"):
    """Accuracy, quadratic cost and cross-entropy cost (means over samples)."""
    y = forward(params, X, activation, loss)
    t = targets_for(targets, y.shape[0], y.shape[1], np.float64)
    n = y.shape[0]
    return {name: float(row_sum(values) / n) for name, values in
            zip(("accuracy", "quadratic_cost", "cross_entropy"), metric_sums(y, t))}


def check_layers(layers):
    layers = [int(n) for n in layers]
    if len(layers) < 2 or min(layers) < 1:
        raise ValueError(f"layers: need at least two positive widths, got {layers}")
    return layers


def check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype: {dtype} is not supported; use float32 or float64")
    return dtype


def check_inputs(params, X, activation, loss):
    """Validate names and ``X`` against ``params``; return X in the params' dtype."""
    activations.get(activation)
    losses.check(loss)
    X = np.asarray(X)
    fan_in = params[0][0].shape[0]
    if X.ndim != 2 or X.shape[1] != fan_in:
        raise ValueError(f"X: shape {X.shape}, expected (N, {fan_in})")
    if X.shape[0] == 0:
        raise ValueError("X: empty batch (0 samples)")
    for i, ((W, b), (W_next, _)) in enumerate(zip(params, params[1:] + [params[-1]])):
        if b.shape != (W.shape[1],) or (i < len(params) - 1 and W_next.shape[0] != W.shape[1]):
            raise ValueError(f"params: layer {i} has W {W.shape} and b {b.shape}, "
                             "which do not chain with the next layer")
    if not np.all(np.isfinite(X)):
        raise ValueError("X: contains NaN or infinity")
    return X.astype(params[0][0].dtype, copy=False)


def params_hash(params):
    """A running SHA-256 of W0, b0, W1, b1, ... as C-order bytes in the run's dtype."""
    h = hashlib.sha256()
    for W, b in params:
        h.update(W.tobytes())
        h.update(b.tobytes())
    return h


def params_digest(params):
    """The hex SHA-256 of the parameters (:func:`params_hash`): a run's ``params_sha256``."""
    return params_hash(params).hexdigest()
