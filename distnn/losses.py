"""Output layer + loss pairs, named by the loss, each with its output delta.

- ``ce``:  softmax outputs, cross-entropy  -sum_k t_k log y_k   (multi-class)
- ``mse``: sigmoid outputs, quadratic cost  1/2 sum_k (t_k - y_k)^2
- ``bce``: sigmoid outputs, binary cross-entropy -sum_k [t log y + (1-t) log(1-y)]

``per_sample_loss`` and ``output_delta`` work on the output pre-activation
``z`` (logits) so that log(0) never happens: log-softmax and softplus are
computed from ``z`` directly. ``output_delta`` is dLoss_i/dz for each sample i
(not divided by the batch size). Functions and sums over outputs come from
:mod:`distnn.fixedmath`: their bits are the same on every machine.
"""

from distnn.activations import sigmoid, softplus
from distnn.fixedmath import log_softmax, row_sum, softmax

LOSSES = ("ce", "mse", "bce")


def output(loss, z):
    """The network's output values for logits ``z``."""
    return softmax(z) if loss == "ce" else sigmoid(z)


def per_sample_loss(loss, z, y, t):
    """Loss of each sample (summed over outputs); shape z.shape[:-1]."""
    if loss == "ce":
        return -row_sum(t * log_softmax(z))
    if loss == "mse":
        return 0.5 * row_sum((t - y) * (t - y))
    return row_sum(t * softplus(-z) + (1 - t) * softplus(z))


def output_delta(loss, z, y, t):
    """dLoss/dz for each sample: y - t for ce and bce, (y - t) y (1 - y) for mse."""
    if loss == "mse":
        return (y - t) * y * (1 - y)
    return y - t


def check(name):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
