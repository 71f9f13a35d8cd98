"""Hidden-layer activations, each forward function beside its derivative.

A derivative takes the pre-activation ``z`` and the activation ``a = f(z)``
(whichever is cheaper to use) and returns f'(z) elementwise. The curved ones
come from :mod:`distnn.fixedmath`, so their bits are the same on every machine.
"""

import numpy as np

from distnn import fixedmath

LEAKY_SLOPE = 0.01


def sigmoid(z):
    return fixedmath.sigmoid(z)


def sigmoid_grad(z, a):
    return a * (1 - a)


def tanh(z):
    return fixedmath.tanh(z)


def tanh_grad(z, a):
    return 1 - a * a


def relu(z):
    return np.maximum(z, 0)


def relu_grad(z, a):
    return (z > 0).astype(z.dtype)


def leaky_relu(z):
    return np.where(z > 0, z, z * z.dtype.type(LEAKY_SLOPE))


def leaky_relu_grad(z, a):
    return np.where(z > 0, z.dtype.type(1), z.dtype.type(LEAKY_SLOPE))


def elu(z):
    return np.where(z > 0, z, fixedmath.expm1(np.minimum(z, 0)))


def elu_grad(z, a):
    return np.where(z > 0, z.dtype.type(1), a + 1)


def softplus(z):
    """log(1 + e^z), stable for large |z|."""
    return fixedmath.softplus(z)


def softplus_grad(z, a):
    return sigmoid(z)


def identity(z):
    return z


def identity_grad(z, a):
    return np.ones_like(z)


ACTIVATIONS = {
    "sigmoid": (sigmoid, sigmoid_grad),
    "tanh": (tanh, tanh_grad),
    "relu": (relu, relu_grad),
    "leaky_relu": (leaky_relu, leaky_relu_grad),
    "elu": (elu, elu_grad),
    "softplus": (softplus, softplus_grad),
    "identity": (identity, identity_grad),
}


def get(name):
    """Return (f, f_grad) for an activation name; ValueError if unknown."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None
