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

from distnn.compiled import flat, kernel


def zero_velocity(params, momentum):
    """The velocity before the first step: zeros like ``params``, or [] without momentum."""
    return [(np.zeros_like(W), np.zeros_like(b)) for W, b in params] if momentum else []


@kernel
def _updated(p, g, v, eta, mu, lam, nesterov, momentum):
    """One element's (p, v) after :func:`update`: its operations, in its order."""
    if lam:
        g = g + lam * p
    if momentum:
        v = v * mu + g
        step = g + mu * v if nesterov else v
    else:
        step = g
    return p - eta * step, v


@kernel
def _update_kernel(p, d, v, eta, mu, lam, nesterov, momentum):
    """update of one 1-d array ``p`` in place (``v`` unused without ``momentum``)."""
    for i in range(p.size):
        p[i], vi = _updated(p[i], d[i], v[i], eta, mu, lam, nesterov, momentum)
        if momentum:
            v[i] = vi


@kernel
def _update_rows_kernel(p, where, d, v, zero, eta, mu, lam, nesterov, momentum):
    """update of 2-d ``p`` in place whose gradient's row r is ``d[where[r]]``, or
    ``zero`` where ``where[r]`` < 0 (``v`` unused without ``momentum``)."""
    for r in range(p.shape[0]):
        k = where[r]
        for j in range(p.shape[1]):
            g = d[k, j] if k >= 0 else zero
            p[r, j], vi = _updated(p[r, j], g, v[r, j], eta, mu, lam, nesterov, momentum)
            if momentum:
                v[r, j] = vi


def update(params, grads, velocity, rate, momentum=0.0, nesterov=False, weight_decay=0.0,
           first_rows=None):
    """Apply one step in place to ``params`` and ``velocity``; ``grads`` (same shapes as
    ``params``) are used as scratch. With ``first_rows``, the first weight gradient holds
    only those rows of it, the others being zero. Returns ``params``."""
    dtype = params[0][0].dtype.type
    eta, mu, lam = dtype(rate), dtype(momentum), dtype(weight_decay)
    items = [(p, g, i % 2 == 0) for (W, b), (gW, gb) in zip(params, grads)
             for i, (p, g) in enumerate(((W, gW), (b, gb)))]
    moments = [v for vW, vb in velocity for v in (vW, vb)] or [None] * len(items)
    if first_rows is not None:
        (W0, rows, _), v0 = items[0], moments[0]
        if _update_rows_kernel:
            where = np.full(len(W0), -1, np.int64)
            where[first_rows] = np.arange(len(first_rows))
            _update_rows_kernel(W0, where, np.ascontiguousarray(rows), W0 if v0 is None else v0,
                                dtype(0), eta, mu, lam, nesterov, v0 is not None)
            items, moments = items[1:], moments[1:]
        else:
            dense = np.zeros_like(W0)
            dense[first_rows] = rows
            items[0] = (W0, dense, True)
    for (p, d, is_weight), v in zip(items, moments):
        if _update_kernel:
            _update_kernel(p.reshape(-1), flat(d), p.reshape(-1) if v is None else v.reshape(-1),
                           eta, mu, lam if is_weight else dtype(0), nesterov, v is not None)
            continue
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
