"""Exact, order-independent sums across rows and MPI ranks.

Floating-point addition is not associative, so summing per-rank partial
gradients in floating point gives different bits for different rank counts.
distnn instead makes every summand an integer held in float64: a sum of
integers stays exact in any order while every partial sum is below 2**53, so
per-rank sums, BLAS's blocking and the MPI ``Allreduce(SUM)`` all give the same
numbers whatever the partition.

Values are put on integer grids by scaling with a power of two agreed by all
ranks (from one ``Allreduce(MAX)`` of exponents) and rounding. With ``N`` rows
in a global batch, ``H = 52 - ceil(log2 N)`` bits are available per summand:

- a plain sum over rows (statistics, bias gradients) rounds each value to
  ``H`` bits below the largest |value| on any rank;
- a weight gradient ``sum_r a_r^T d_r`` splits the bits between the two
  factors, which are multiplied by one float64 GEMM. The first layer's input
  is the pixel value 0..255 itself, already an integer (8 bits), leaving
  ``H - 8`` bits for the delta (36 bits at N = 256); deeper layers give each
  factor about ``H / 2`` bits (22 at N = 256).

Each row's own values have fixed bits whatever rows share its products
(:mod:`distnn.products`), and the grids come from maxima over the whole global
batch, so the rounded integers, and hence the sums, do not depend on the rank
count either.
"""

import numpy as np
from mpi4py import MPI

from distnn import model, products
from distnn.compiled import flat, kernel

EMPTY = -(2**40)  # exponent of a part with no nonzero values on this rank
MIN_EXP = products.MIN_EXP  # parts below 2**-900 count as zero (keeps 2**shift finite)


class NonFiniteError(ArithmeticError):
    """Some rank produced a NaN or infinity in a value to be summed."""


def headroom_bits(total_rows):
    """Bits per summand such that ``total_rows`` of them stay below 2**52."""
    return 52 - products.ceil_log2(total_rows)


def exponent(x):
    """e with max|x| < 2**e (EMPTY for all zeros); raises NonFiniteError on NaN/inf."""
    peak = float(products.abs_peaks(x.reshape(1, -1), 1)[0]) if x.size else 0.0
    if not np.isfinite(peak):
        raise NonFiniteError("a NaN or infinity appeared in the loss or gradients")
    return max(int(np.frexp(peak)[1]), MIN_EXP) if peak > 0 else EMPTY


def off_grid(total, shift, out=None):
    """total * 2**-shift, exactly (a power of two): one multiply, unless 2**-shift would
    leave float64's range (``out``: where to write it, as numpy's)."""
    if abs(shift) < 900:
        return np.multiply(total, 2.0 ** -shift, out=out)
    return np.ldexp(total, -shift, out=out)


@kernel
def _on_grid_kernel(x, scale, out):
    """on_grid of 1-d ``x`` into ``out``, one element at a time."""
    for i in range(x.size):
        out[i] = np.rint(np.float64(x[i]) * scale)


def on_grid(x, shift):
    """round(x * 2**shift) as integer-valued float64."""
    if _on_grid_kernel:
        grid = np.empty(x.shape)
        _on_grid_kernel(flat(x), 2.0 ** shift, grid.reshape(-1))
        return grid
    grid = np.multiply(x, 2.0 ** shift, dtype=np.float64)
    return np.rint(grid, out=grid)


class _Agreement:
    """One Allreduce(MAX) over a vector of exponents and a non-finite flag: the grids
    every rank uses, or NonFiniteError on every rank when any rank saw a NaN or inf."""

    def __init__(self, n, comm):
        self.comm = comm
        self.local = np.zeros(n + 1, dtype=np.int64)
        self.agreed = np.zeros(n + 1, dtype=np.int64)

    def __call__(self, arrays):
        self.local[-1] = 0
        for k, x in enumerate(arrays):
            try:
                self.local[k] = exponent(x)
            except NonFiniteError:
                self.local[k], self.local[-1] = EMPTY, 1
        self.comm.Allreduce(self.local, self.agreed, op=MPI.MAX)
        if self.agreed[-1]:
            raise NonFiniteError("a NaN or infinity appeared in the loss or gradients")
        exps = self.agreed[:-1].copy()
        exps[exps == EMPTY] = 0
        return [int(e) for e in exps]


class ExactSum:
    """Exact column sums over the rows of every rank, for arrays of fixed widths."""

    def __init__(self, widths, comm=MPI.COMM_SELF):
        self.comm = comm
        self.offsets = np.concatenate([[0], np.cumsum(widths)]).astype(int)
        self.buffer = np.zeros(self.offsets[-1])
        self.total = np.zeros_like(self.buffer)
        self.agree = _Agreement(len(widths), comm)

    def __call__(self, parts, total_rows):
        """``parts[k]`` is (local rows, widths[k]); returns the global sums, float64."""
        shifts = [headroom_bits(total_rows) - e for e in self.agree(parts)]
        for k, part in enumerate(parts):
            self.buffer[self.offsets[k]:self.offsets[k + 1]] = on_grid(part, shifts[k]).sum(axis=0)
        self.comm.Allreduce(self.buffer, self.total, op=MPI.SUM)
        return [off_grid(self.total[self.offsets[k]:self.offsets[k + 1]], shifts[k])
                for k in range(len(parts))]


class ExactGradients:
    """Exact ``sum_r a_r^T d_r`` and ``sum_r d_r`` per layer, plus statistic sums.

    ``layers`` are the widths; the first layer's input must be integer-valued
    with |value| < 2**first_input_bits (pixels 0..255: 8 bits).

    One preallocated buffer holds every sum, in named slices: the small parts
    first (``bias_sums``, ``weight_sums`` of the deeper layers,
    ``stat_sums``), then the first weight matrix's rows. A call may name the
    only first-layer input columns that are non-zero anywhere in the batch
    (``first_rows``, the same on every rank); then only those rows of the
    first weight gradient are computed, sent and returned (the others are
    exactly zero), and the Allreduce covers just that prefix of the buffer.
    """

    def __init__(self, layers, n_stats, comm=MPI.COMM_SELF, first_input_bits=model.PIXEL_BITS):
        self.comm = comm
        self.first_input_bits = first_input_bits
        self.shapes = [(i, o) for i, o in zip(layers[:-1], layers[1:])]
        small = [self.shapes[0][1]] + [n for i, o in self.shapes[1:] for n in (i * o, o)] + [n_stats]
        offsets = np.concatenate([[0], np.cumsum(small)]).astype(int)
        self.buffer = np.zeros(offsets[-1] + layers[0] * layers[1])
        views = [self.buffer[lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:])]
        self.bias_sums = [views[0]] + views[2:-1:2]  # b0, b1, ...
        self.weight_sums = [None] + [v.reshape(s) for v, s in zip(views[1:-1:2], self.shapes[1:])]
        self.stat_sums = views[-1]
        self.first_start = offsets[-1]  # W0's rows follow the small parts
        self.agree = _Agreement(2 * len(self.shapes), comm)  # inputs 1.., deltas, stats

    def __call__(self, inputs, deltas, stats, total_rows, first_rows=None):
        """Sum over all rows of all ranks.

        ``inputs[l]`` (rows, fan_in) is layer l's input (``inputs[0]`` the integer
        pixels, only the ``first_rows`` columns if given), ``deltas[l]`` (rows,
        fan_out) its dLoss/dz, ``stats`` (rows, n). Returns ([(sum a^T d, sum d)
        per layer], stat sums), all float64 and exact to their grids; the first
        weight sum has one row per ``first_rows`` entry (all rows if None). The
        gradient sums are views of this object's buffer, valid until its next call.
        """
        n_layers = len(self.shapes)
        exps = self.agree(list(inputs[1:]) + list(deltas) + [stats])
        in_exps, d_exps, stat_exp = [None] + exps[:n_layers - 1], exps[n_layers - 1:-1], exps[-1]
        bits = headroom_bits(total_rows)
        first_rows = np.arange(self.shapes[0][0]) if first_rows is None else first_rows
        w0_end = self.first_start + len(first_rows) * self.shapes[0][1]
        weight_sums = [self.buffer[self.first_start:w0_end].reshape(len(first_rows), -1),
                       *self.weight_sums[1:]]
        shifts = []
        for l, (a, d) in enumerate(zip(inputs, deltas)):
            if l == 0:  # pixels are integers already
                qa, a_shift, d_bits = a, 0, bits - self.first_input_bits
            else:
                a_bits = bits // 2
                a_shift, d_bits = a_bits - in_exps[l], bits - a_bits
                qa = on_grid(a, a_shift)
            d_shift = d_bits - d_exps[l]
            qd = on_grid(d, d_shift)
            products.GEMM(qa.T, qd, out=weight_sums[l])
            np.sum(qd, axis=0, out=self.bias_sums[l])
            shifts.append((a_shift + d_shift, d_shift))
        stat_shift = bits - stat_exp
        self.stat_sums[:] = on_grid(stats, stat_shift).sum(axis=0)
        self.comm.Allreduce(MPI.IN_PLACE, self.buffer[:w0_end], op=MPI.SUM)
        sums = [(off_grid(weight_sums[l], w_shift, out=weight_sums[l]),  # in the buffer
                 off_grid(self.bias_sums[l], b_shift, out=self.bias_sums[l]))
                for l, (w_shift, b_shift) in enumerate(shifts)]
        return sums, off_grid(self.stat_sums, stat_shift)
