"""One step of exact data-parallel training, as the trainer and the bench take it.

Each rank runs forward and backward on its share of the global mini-batch
(:mod:`distnn.batch`). Every row's values have fixed bits of their own
(:mod:`distnn.model`: exact products, distnn's own functions), whatever rows
share its product, and the gradients are summed exactly (:mod:`distnn.exact`)
with one Allreduce, so every rank count, BLAS and CPU produces the same
parameters, bit for bit. The update is :mod:`distnn.optim`'s.

:func:`gradients` and :func:`train_step` are the arithmetic; :class:`Stepper`
adds what a step does around it on every rank (reading the batch, agreeing
on a stop signal) and times it (:mod:`distnn.timing`).
"""

import numpy as np

from distnn import losses, model, optim
from distnn.batch import BatchColumns, local_share, pixel_columns
from distnn.exact import ExactGradients
from distnn.parallel import SignalAgreement
from distnn.state import N_STATS
from distnn.timing import StepTimer, TimedComm



def train_stats(cfg, z, y, T):
    """Per-row loss and correct (0/1) of a training step; (rows, N_STATS)."""
    stats = np.empty((len(z), N_STATS))
    stats[:, 0] = losses.per_sample_loss(cfg.loss, z, y, T)
    stats[:, 1] = model.is_correct(y, T)
    return stats


def mean_gradients(sums, params, columns, n_rows, used_rows=False):
    """The exact sums of :class:`distnn.exact.ExactGradients` (float64) as the mean over the batch's ``n_rows``, in the parameters' dtype:
    one rounding each.

    The first layer's inputs were the integer pixels, which stand for their value
    times ``model.PIXEL_SCALE``; the rows of the unused ``columns`` are 0 exactly.
    With ``used_rows`` the first weight gradient holds only the ``columns`` rows (for
    :func:`distnn.optim.update`'s ``first_rows``).
    """
    (W0, _), dtype = params[0], params[0][0].dtype

    def mean(total, factor):  # one float64 multiply, stored in the dtype: one pass
        return np.multiply(total, factor, out=np.empty(total.shape, dtype), casting="unsafe")
    grads = []
    for l, (w_sum, b_sum) in enumerate(sums):
        if l == 0:
            gW = mean(w_sum, model.PIXEL_SCALE / n_rows)
            if not used_rows:
                gW, rows = np.zeros_like(W0), gW
                gW[columns] = rows
        else:
            gW = mean(w_sum, 1 / n_rows)
        grads.append((gW, mean(b_sum, 1 / n_rows)))
    return grads


def gradients(params, cfg, pixels, T, columns, reducer, n_rows, used_rows=False):
    """The mean gradient of the data cost over the global batch, and the batch's stat sums.

    ``pixels`` are uint8 (rows, 784) and ``T`` the targets in the run's dtype
    (:func:`distnn.batch.local_share`), ``columns`` the batch's non-zero pixel
    columns (:class:`distnn.batch.BatchColumns`), ``n_rows`` the global batch size,
    ``reducer`` a :class:`distnn.exact.ExactGradients`. The gradients are shaped
    like ``params``, in their dtype (the first weight's only the ``columns`` rows with
    ``used_rows``: :func:`mean_gradients`).
    """
    X = pixel_columns(pixels, columns)
    (W0, b0), rest = params[0], params[1:]
    narrowed = [(W0[columns], b0), *rest]
    inputs, zs, y = model.forward_pass(narrowed, X, cfg.activation, cfg.loss, pixels=True)
    delta = losses.output_delta(cfg.loss, zs[-1], y, T)
    deltas = model.layer_deltas(narrowed, inputs, zs, delta, cfg.activation)
    sums, stat_sums = reducer(inputs, deltas, train_stats(cfg, zs[-1], y, T), n_rows,
                              first_rows=columns)
    return mean_gradients(sums, params, columns, n_rows, used_rows), stat_sums


def train_step(params, velocity, rate, cfg, pixels, T, columns, reducer, n_rows):
    """One step at learning rate ``rate``: :func:`gradients`, then the update of
    :mod:`distnn.optim`, in place on ``params`` and ``velocity``. Returns
    (params, global stat sums)."""
    grads, stat_sums = gradients(params, cfg, pixels, T, columns, reducer, n_rows,
                                 used_rows=True)
    optim.update(params, grads, velocity, rate, cfg.momentum, cfg.nesterov, cfg.weight_decay,
                 first_rows=columns)
    return params, stat_sums


class Stepper:
    """The trainer's whole step on ``comm``, timed by one :class:`distnn.timing.StepTimer`
    (``timer``): read this rank's share of a global batch and the batch's columns, take
    one exact step, and agree on a stop signal so every rank stops after the same step."""

    def __init__(self, cfg, comm):
        self.cfg = cfg
        self.comm = TimedComm(comm)
        self.reducer = ExactGradients(cfg.layers, N_STATS, self.comm)
        self.batch_columns = BatchColumns(cfg.layers[0], self.comm)
        self.any_signal = SignalAgreement(self.comm)
        self.timer = StepTimer(self.comm)

    def __call__(self, params, velocity, rate, data, batch, signum=0):
        """One step on global ``batch`` (training positions), in place on ``params`` and
        ``velocity``; returns (the batch's stat sums, the largest ``signum`` of any rank)."""
        self.timer.start()
        pixels, T = local_share(data, batch, self.cfg, self.comm.comm)
        columns = self.batch_columns(data, batch, pixels)
        self.timer.loaded()
        _, stat_sums = train_step(params, velocity, rate, self.cfg, pixels, T, columns,
                                  self.reducer, len(batch))
        agreed = self.any_signal(signum)
        self.timer.stepped()
        return stat_sums, agreed
