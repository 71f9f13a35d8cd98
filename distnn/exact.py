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

The rows' own values come from fixed-size blocks whose bits do not depend on
the rank count, so the rounded integers, and hence the sums, do not either.
"""

import time

import numpy as np
from mpi4py import MPI

EMPTY = -(2**40)  # exponent of a part with no nonzero values on this rank
MIN_EXP = -900    # parts below 2**-900 count as zero (keeps 2**shift finite)


class NonFiniteError(ArithmeticError):
    """Some rank produced a NaN or infinity in a value to be summed."""


def headroom_bits(total_rows):
    """Bits per summand such that ``total_rows`` of them stay below 2**52."""
    return 52 - max(int(total_rows) - 1, 0).bit_length()


def exponent(x):
    """e with max|x| < 2**e (EMPTY for all zeros); raises NonFiniteError on NaN/inf."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if not np.isfinite(peak):
        raise NonFiniteError("a NaN or infinity appeared in the loss or gradients")
    return max(int(np.frexp(peak)[1]), MIN_EXP) if peak > 0 else EMPTY


def off_grid(total, shift, factor):
    """total * 2**-shift * factor, in one pass unless 2**-shift would leave float64's range."""
    if abs(shift) < 900:
        return total * (2.0 ** -shift * factor)
    return np.ldexp(total, -shift) * factor


def on_grid(x, shift):
    """round(x * 2**shift) as integer-valued float64."""
    grid = np.multiply(x, 2.0 ** shift, dtype=np.float64)
    return np.rint(grid, out=grid)


class _Agreement:
    """One Allreduce(MAX) over a vector of exponents plus a non-finite flag."""

    def __init__(self, n, comm):
        self.comm = comm
        self.local = np.zeros(n + 1, dtype=np.int64)
        self.agreed = np.zeros(n + 1, dtype=np.int64)
        self.seconds = 0.0  # time in the last Allreduce

    def __call__(self, arrays):
        self.local[-1] = 0
        for k, x in enumerate(arrays):
            try:
                self.local[k] = exponent(x)
            except NonFiniteError:
                self.local[k], self.local[-1] = EMPTY, 1
        start = time.perf_counter()
        self.comm.Allreduce(self.local, self.agreed, op=MPI.MAX)
        self.seconds = time.perf_counter() - start
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
        return [off_grid(self.total[self.offsets[k]:self.offsets[k + 1]], shifts[k], 1.0)
                for k in range(len(parts))]


class ExactGradients:
    """Exact ``sum_r a_r^T d_r`` and ``sum_r d_r`` per layer, plus statistic sums.

    ``layers`` are the widths; the first layer's input must be integer-valued
    with |value| < 2**first_input_bits (pixels 0..255: 8 bits) and stands for
    that integer times ``first_input_scale`` (1/255: pixels scaled to [0, 1]).
    """

    def __init__(self, layers, n_stats, comm=MPI.COMM_SELF, first_input_bits=8,
                 first_input_scale=1 / 255):
        self.comm = comm
        self.first_input_bits = first_input_bits
        self.first_input_scale = first_input_scale
        self.shapes = [(i, o) for i, o in zip(layers[:-1], layers[1:])]
        sizes = [n for i, o in self.shapes for n in (i * o, o)] + [n_stats]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.buffer = np.zeros(self.offsets[-1])
        self.total = np.zeros_like(self.buffer)
        n_layers = len(self.shapes)
        self.agree = _Agreement(2 * n_layers, comm)  # inputs 1.., deltas, stats
        self.comm_seconds = 0.0  # time of the last call's two Allreduces

    def _slot(self, k):
        return self.buffer[self.offsets[k]:self.offsets[k + 1]]

    def __call__(self, inputs, deltas, stats, total_rows, divide_by=1):
        """Sum over all rows of all ranks, divided by ``divide_by`` (the batch size for means).

        ``inputs[l]`` (rows, fan_in) is layer l's input (``inputs[0]`` the integer
        pixels), ``deltas[l]`` (rows, fan_out) its dLoss/dz, ``stats`` (rows, n).
        Returns ([(sum a^T d, sum d) per layer], stat sums), all float64; the
        statistics are not divided.
        """
        exps = self.agree(list(inputs[1:]) + list(deltas) + [stats])
        n_layers = len(self.shapes)
        in_exps, d_exps, stat_exp = [None] + exps[:n_layers - 1], exps[n_layers - 1:-1], exps[-1]
        bits = headroom_bits(total_rows)
        scales = []
        for l, (a, d) in enumerate(zip(inputs, deltas)):
            if l == 0:
                qa, a_shift, d_bits = a, 0, bits - self.first_input_bits
            else:
                a_bits = bits // 2
                a_shift, d_bits = a_bits - in_exps[l], bits - a_bits
                qa = on_grid(a, a_shift)
            d_shift = d_bits - d_exps[l]
            qd = on_grid(d, d_shift)
            np.matmul(qa.T, qd, out=self._slot(2 * l).reshape(self.shapes[l]))
            np.sum(qd, axis=0, out=self._slot(2 * l + 1))
            scales.append((a_shift + d_shift, d_shift))
        stat_shift = bits - stat_exp
        self._slot(2 * n_layers)[:] = on_grid(stats, stat_shift).sum(axis=0)
        start = time.perf_counter()
        self.comm.Allreduce(self.buffer, self.total, op=MPI.SUM)
        self.comm_seconds = time.perf_counter() - start + self.agree.seconds
        grads = []
        for l, (w_shift, b_shift) in enumerate(scales):
            w_factor = (self.first_input_scale if l == 0 else 1) / divide_by
            W = off_grid(self.total[self.offsets[2 * l]:self.offsets[2 * l + 1]], w_shift, w_factor)
            b = off_grid(self.total[self.offsets[2 * l + 1]:self.offsets[2 * l + 2]], b_shift,
                         1 / divide_by)
            grads.append((W.reshape(self.shapes[l]), b))
        stat_sums = off_grid(self.total[self.offsets[-2]:], stat_shift, 1.0)
        return grads, stat_sums
