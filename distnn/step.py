"""One step of exact data-parallel SGD, and distributed evaluation.

Each global mini-batch is cut into blocks of ``block_size`` rows (the last one
padded and masked). Each rank takes a contiguous run of blocks, runs forward
and backward block by block, and the gradients are summed exactly
(:mod:`distnn.exact`) with one Allreduce. Block bits do not depend on the rank
count and the exact sum does not depend on the order, so every rank count
produces the same parameters, bit for bit.
"""

import numpy as np
from mpi4py import MPI

from distnn import losses, model
from distnn.comm import agree

EVAL_BLOCK = 250  # rows per evaluation block: fixed, so metrics do not depend on P
N_STATS = 2       # per training row: loss, correct
N_EVAL_STATS = 3  # per evaluated row: correct, quadratic cost, cross-entropy


def block_range(n_blocks, size, rank):
    """The contiguous run of blocks [lo, hi) that ``rank`` of ``size`` works on."""
    base, extra = divmod(n_blocks, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def task_labels(labels, positive_digit):
    """The labels of the task trained: the digits, or 1 for ``positive_digit`` and 0 for
    every other digit (one digit against the rest)."""
    return labels if positive_digit is None else (labels == positive_digit).astype(np.int64)


def pad_rows(a, rows):
    """``a`` with zero rows appended up to ``rows`` (``a`` itself if it has them all)."""
    if len(a) == rows:
        return a
    padded = np.zeros((rows, *a.shape[1:]), a.dtype)
    padded[:len(a)] = a
    return padded


def stack_blocks(images, labels, n_blocks, block_size, n_out, dtype=np.float64):
    """Pad rows to n_blocks * block_size; return uint8 pixels (rows, 784), and targets
    (one-hot, or the 0/1 label itself for a single output) and the row mask in ``dtype``.

    Padding rows are zero and masked out; ``rows = n_blocks * block_size``.
    """
    rows = n_blocks * block_size
    pixels = pad_rows(images, rows)
    targets = np.zeros((rows, n_out), dtype)
    if n_out == 1:
        targets[:len(labels), 0] = labels
    else:
        targets[np.arange(len(labels)), labels] = 1
    mask = np.zeros(rows, dtype)
    mask[:len(images)] = 1
    return pixels, targets, mask


def share(data, split, positions, block_size, cfg, comm, dtype):
    """This rank's contiguous run of blocks of ``positions`` in ``split``: (pixels,
    targets, mask) as :func:`stack_blocks` gives them, and the row count padded to
    whole blocks."""
    n_blocks = -(-len(positions) // block_size)
    lo, hi = block_range(n_blocks, comm.size, comm.rank)
    mine = positions[lo * block_size:hi * block_size]
    # a streamed read can find damaged or changed rows on one rank: all ranks end together
    images, labels = agree(comm, data.get, split, mine) if data.stream else data.get(split, mine)
    return (*stack_blocks(images, task_labels(labels, cfg.positive_digit), hi - lo,
                          block_size, cfg.layers[-1], dtype),
            n_blocks * block_size)


def local_share(data, batch, cfg, comm):
    """This rank's share of the global ``batch`` (training positions), in the run's dtype."""
    return share(data, "train", batch, cfg.block_size, cfg, comm, cfg.np_dtype)


def as_blocks(a, block_size):
    """Rows (n, w) as (n / block_size, block_size, w); w may be 0 (a batch of blank images)."""
    return a.reshape(len(a) // block_size, block_size, a.shape[-1])


def scaled_blocks(pixels, dtype, block_size):
    """Pixels 0..255 as [0, 1] values in ``dtype``, shaped (blocks, block_size, columns)."""
    return as_blocks(np.divide(pixels, dtype(255), dtype=dtype), block_size)


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


def train_stats(cfg, z, y, T, mask):
    """Per-row loss and correct (0/1) of a training step, zero on padding; (rows, 2)."""
    stats = np.empty((*mask.shape, N_STATS))
    stats[..., 0] = losses.per_sample_loss(cfg.loss, z, y, T)
    stats[..., 1] = model.is_correct(y, T)
    stats *= mask[..., None]
    return stats


def eval_stats(y, T, mask):
    """Per-row correct, quadratic cost and cross-entropy, zero on padding; (rows, 3)."""
    return np.stack(model.metric_sums(y, T), axis=-1) * mask[..., None]


def train_step(params, cfg, pixels, T, mask, columns, reducer, n_rows, total_rows, carry=0):
    """One SGD step on this rank's rows (whole blocks), updating ``params`` in place;
    returns (params, global stat sums).

    ``pixels`` are uint8 (rows, 784), ``T`` and ``mask`` in the run's dtype
    (:func:`local_share`), ``columns`` the batch's non-zero pixel
    columns (:class:`BatchColumns`); ``n_rows`` is the global batch size,
    ``total_rows`` the same padded to whole blocks. Forward and backward run
    block by block (the bits of a block do not depend on the rank count); the
    gradients are summed exactly by ``reducer``, which also agrees ``carry``
    across ranks (``reducer.carried``).
    """
    dtype, bs = cfg.np_dtype, cfg.block_size
    used = pixels[:, columns]
    X = scaled_blocks(used, dtype, bs)
    (W0, b0), rest = params[0], params[1:]
    W0_used = W0[columns]  # a copy, updated in place and written back by sgd_update
    narrowed = [(W0_used, b0), *rest]
    Tb, maskb = as_blocks(T, bs), as_blocks(mask[:, None], bs)
    inputs, zs, y = model.forward_pass(narrowed, X, cfg.activation, cfg.loss)
    delta = losses.output_delta(cfg.loss, zs[-1], y, Tb) * maskb
    deltas = model.layer_deltas(narrowed, inputs, zs, delta, cfg.activation)
    rows = len(pixels)
    flat_inputs = [used.astype(np.float64)] + [a.reshape(rows, a.shape[-1]) for a in inputs[1:]]
    flat_deltas = [d.reshape(rows, d.shape[-1]) for d in deltas]
    stats = train_stats(cfg, zs[-1], y, Tb, maskb[..., 0]).reshape(rows, N_STATS)
    steps, stat_sums = reducer(flat_inputs, flat_deltas, stats, total_rows,
                               divide_by=n_rows / cfg.lr, first_rows=columns, carry=carry)
    return sgd_update(params, steps, columns, W0_used), stat_sums


def sgd_update(params, steps, first_rows, first_used):
    """``p -= step`` in place, ``step`` being the learning rate times the mean gradient.

    The first weight matrix's step holds only the ``first_rows`` rows; the other
    rows' gradient is exactly zero, and ``w - 0`` is ``w``, so they are skipped.
    ``first_used`` is the copy of those rows the step already gathered: it is
    updated and written back.
    """
    first_used -= steps[0][0]
    params[0][0][first_rows] = first_used
    for i, ((W, b), (sW, sb)) in enumerate(zip(params, steps)):
        if i:
            W -= sW
        b -= sb
    return params


def predict(params, images, activation, loss, dtype):
    """Output values for uint8 images (n, 784), bit for bit what evaluation scores."""
    pixels = pad_rows(images, -(-len(images) // EVAL_BLOCK) * EVAL_BLOCK)
    y = model.forward_pass(params, scaled_blocks(pixels, dtype, EVAL_BLOCK), activation, loss)[2]
    return y.reshape(-1, y.shape[-1])[:len(images)]


def evaluate(params, cfg, data, split, comm, reducer):
    """Accuracy, quadratic cost and cross-entropy on a split, scored across ranks (None if empty)."""
    n = data.size(split)
    if n == 0:
        return None
    pixels, T, mask, total_rows = share(data, split, np.arange(n), EVAL_BLOCK, cfg, comm,
                                        np.float64)
    X = scaled_blocks(pixels, cfg.np_dtype, EVAL_BLOCK)
    _, zs, y = model.forward_pass(params, X, cfg.activation, cfg.loss)
    stats = eval_stats(y, as_blocks(T, EVAL_BLOCK), as_blocks(mask[:, None], EVAL_BLOCK)[..., 0])
    correct, quad, cross = reducer([stats.reshape(len(pixels), N_EVAL_STATS)], total_rows)[0]
    return {"acc": correct / n, "quadratic_cost": quad / n, "cross_entropy": cross / n}
