"""One step of exact data-parallel training, and distributed evaluation.

Each rank takes a contiguous share of the global mini-batch's rows and runs
forward and backward on them. Every row's values have fixed bits of their
own (:mod:`distnn.model`: exact products, distnn's own functions), whatever
rows share its product, and the gradients are summed exactly
(:mod:`distnn.exact`) with one Allreduce, so every rank count, BLAS and CPU
produces the same parameters, bit for bit.
"""

import numpy as np
from mpi4py import MPI

from distnn import losses, model, optim
from distnn.parallel import agree

EVAL_CHUNK = 2000  # rows evaluated at once: bounds memory; changes no bit
N_STATS = 2        # per training row: loss, correct
N_EVAL_STATS = 3   # per evaluated row: correct, quadratic cost, cross-entropy


def row_range(n_rows, size, rank):
    """The contiguous rows [lo, hi) of ``n_rows`` that ``rank`` of ``size`` works on."""
    base, extra = divmod(n_rows, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def task_labels(labels, positive_digit):
    """The labels of the task trained: the digits, or 1 for ``positive_digit`` and 0 for
    every other digit (one digit against the rest)."""
    return labels if positive_digit is None else (labels == positive_digit).astype(np.int64)


def share(data, split, positions, cfg, comm, dtype):
    """This rank's contiguous share of ``positions`` in ``split``: uint8 pixels
    (rows, 784) and targets in ``dtype``."""
    lo, hi = row_range(len(positions), comm.size, comm.rank)
    mine = positions[lo:hi]
    # a streamed read can find damaged or changed rows on one rank: all ranks end together
    images, labels = agree(comm, data.get, split, mine) if data.stream else data.get(split, mine)
    return images, model.targets_for(task_labels(labels, cfg.positive_digit), len(images),
                                      cfg.layers[-1], dtype)


def local_share(data, batch, cfg, comm):
    """This rank's share of the global ``batch`` (training positions), in the run's dtype."""
    return share(data, "train", batch, cfg, comm, cfg.np_dtype)


class BatchColumns:
    """The pixel columns that are non-zero somewhere in the global batch.

    Columns that are zero in every row of the batch add nothing to the first
    layer's forward pass or gradient, so a step skips them (about a third of
    MNIST's pixels in a 256-row batch). The set comes from the whole global
    batch, so it is the same for every rank count and the result stays
    bit-identical: from the data set's per-row masks when every rank holds it
    (:meth:`distnn.data.Dataset.nonzero_columns`), otherwise, when streaming,
    from one ``Allreduce(BOR)`` of a 784-byte mask (this class).
    """

    def __init__(self, width, comm=MPI.COMM_SELF):
        self.comm = comm
        self.local = np.zeros(width, np.uint8)
        self.union = np.zeros(width, np.uint8)

    def __call__(self, data, batch, pixels):
        """The columns for global ``batch``, of which this rank holds ``pixels``."""
        columns = data.nonzero_columns(batch)
        if columns is not None:
            return columns
        np.any(pixels, axis=0, out=self.local.view(bool))
        self.comm.Allreduce(self.local, self.union, op=MPI.BOR)
        return np.flatnonzero(self.union)


def train_stats(cfg, z, y, T):
    """Per-row loss and correct (0/1) of a training step; (rows, 2)."""
    stats = np.empty((len(z), N_STATS))
    stats[:, 0] = losses.per_sample_loss(cfg.loss, z, y, T)
    stats[:, 1] = model.is_correct(y, T)
    return stats


def eval_stats(y, T):
    """Per-row correct, quadratic cost and cross-entropy; (rows, 3)."""
    return np.stack(model.metric_sums(y, T), axis=-1)


def gradients(params, cfg, pixels, T, columns, reducer, n_rows, carry=0):
    """The mean gradient of the data cost over the global batch, and the batch's stat sums.

    ``pixels`` are uint8 (rows, 784) and ``T`` the targets in the run's dtype
    (:func:`local_share`), ``columns`` the batch's non-zero pixel columns
    (:class:`BatchColumns`), ``n_rows`` the global batch size. The gradients
    (shaped like ``params``, in their dtype) are summed exactly by ``reducer``,
    which also agrees ``carry`` across ranks (``reducer.carried``).
    """
    X = pixels[:, columns].astype(np.float64)
    (W0, b0), rest = params[0], params[1:]
    narrowed = [(W0[columns], b0), *rest]
    inputs, zs, y = model.forward_pass(narrowed, X, cfg.activation, cfg.loss, pixels=True)
    delta = losses.output_delta(cfg.loss, zs[-1], y, T)
    deltas = model.layer_deltas(narrowed, inputs, zs, delta, cfg.activation)
    stats = train_stats(cfg, zs[-1], y, T)
    grads, stat_sums = reducer(inputs, deltas, stats, n_rows, divide_by=n_rows,
                               first_rows=columns, carry=carry)
    gW0 = np.zeros_like(W0)  # the rows of unused columns have gradient 0 exactly
    gW0[columns] = grads[0][0]
    return [(gW0, grads[0][1]), *grads[1:]], stat_sums


def train_step(params, velocity, rate, cfg, pixels, T, columns, reducer, n_rows, carry=0):
    """One step at learning rate ``rate``: :func:`gradients`, then the update of
    :mod:`distnn.optim`, in place on ``params`` and ``velocity``. Returns
    (params, global stat sums)."""
    grads, stat_sums = gradients(params, cfg, pixels, T, columns, reducer, n_rows, carry)
    optim.update(params, grads, velocity, rate, cfg.momentum, cfg.nesterov, cfg.weight_decay)
    return params, stat_sums


def output_values(params, images, activation, loss):
    """Output values for uint8 images (n, 784), EVAL_CHUNK rows at a time: each row's
    bits are its own, so this is bit for bit what evaluation scores."""
    chunks = [model.forward_pass(params, images[i:i + EVAL_CHUNK], activation, loss,
                                 pixels=True)[2] for i in range(0, len(images), EVAL_CHUNK)]
    return np.concatenate(chunks) if chunks else np.zeros((0, params[-1][0].shape[1]))


def evaluate(params, cfg, data, split, comm, reducer):
    """Accuracy, quadratic cost and cross-entropy on a split, scored across ranks (None if empty)."""
    n = data.size(split)
    if n == 0:
        return None
    pixels, T = share(data, split, np.arange(n), cfg, comm, np.float64)
    y = output_values(params, pixels, cfg.activation, cfg.loss)
    correct, quad, cross = reducer([eval_stats(y, T)], n)[0]
    return {"acc": correct / n, "quadratic_cost": quad / n, "cross_entropy": cross / n}
