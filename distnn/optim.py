"""The parameter update: SGD with heavy-ball or Nesterov momentum and L2 weight decay.

With ``g`` the mean gradient of the data cost over the global batch, ``eta``
the step's rate (:mod:`distnn.schedule`), ``mu`` the momentum and ``lam`` the
weight decay, each weight array ``w`` (biases: ``lam = 0``) is updated as::

    d = g + lam * w                 L2: the cost gains lam / 2 * sum(w ** 2)
    v = mu * v + d                  velocity, kept between steps (none when mu = 0)
    w = w - eta * v                 heavy ball
    w = w - eta * (d + mu * v)      Nesterov (Sutskever et al. 2013, as PyTorch writes it)

This is the form of Goyal et al. (2017): the rate multiplies the velocity, so
a changing rate needs no momentum correction. At a constant rate it equals the
classic texts' ``v = mu * v - eta * d; w = w + v``, with their ``v`` being
``-eta`` times this one. (Nielsen's ``lambda`` over ``n`` training images is
``lam = lambda / n`` here.)

Every operation is one elementwise numpy operation in the parameters' dtype
with the scalars in that dtype: each result is the IEEE-754 rounding of its
exact value, so the update has the same bits on every machine, and because
every rank holds the same gradient, on every rank.
"""

import numpy as np


def zero_velocity(params, momentum):
    """The velocity before the first step: zeros like ``params``, or [] without momentum."""
    return [(np.zeros_like(W), np.zeros_like(b)) for W, b in params] if momentum else []


def update(params, grads, velocity, rate, momentum=0.0, nesterov=False, weight_decay=0.0):
    """Apply one step in place to ``params`` and ``velocity``; ``grads`` (same shapes as
    ``params``) are used as scratch. Returns ``params``."""
    dtype = params[0][0].dtype.type
    eta, mu, lam = dtype(rate), dtype(momentum), dtype(weight_decay)
    pairs = [(p, g, i % 2 == 0) for (W, b), (gW, gb) in zip(params, grads)
             for i, (p, g) in enumerate(((W, gW), (b, gb)))]
    moments = [v for vW, vb in velocity for v in (vW, vb)] or [None] * len(pairs)
    for (p, d, is_weight), v in zip(pairs, moments):
        if lam and is_weight:
            d += lam * p
        if v is None:
            step = d
        else:
            v *= mu
            v += d
            step = d + mu * v if nesterov else v
        p -= eta * step
    return params
