"""What one rank trains on in a step: its rows of the global mini-batch, and the
batch's pixel columns that are in use."""

import numpy as np
from mpi4py import MPI

from distnn import model
from distnn.compiled import kernel
from distnn.parallel import agree, my_rows


def share(data, split, positions, cfg, comm, dtype):
    """This rank's contiguous share of ``positions`` in ``split``: uint8 pixels
    (rows, 784) and targets in ``dtype``."""
    mine = my_rows(positions, comm)
    # a streamed read can find damaged or changed rows on one rank: all ranks end together
    images, labels = agree(comm, data.get, split, mine) if data.stream else data.get(split, mine)
    return images, model.targets_for(model.task_labels(labels, cfg.positive_digit), len(images),
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


@kernel
def _pixel_columns_kernel(pixels, columns, out):
    """pixel_columns into ``out``, one row at a time."""
    for i in range(pixels.shape[0]):
        for k in range(columns.size):
            out[i, k] = pixels[i, columns[k]]


def pixel_columns(pixels, columns):
    """The ``columns`` of uint8 ``pixels`` as float64: the first layer's integer input."""
    if _pixel_columns_kernel is None:
        return pixels[:, columns].astype(np.float64)
    out = np.empty((len(pixels), len(columns)))
    _pixel_columns_kernel(np.ascontiguousarray(pixels), np.asarray(columns, np.int64), out)
    return out
