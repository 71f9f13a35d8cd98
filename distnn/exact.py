"""Exact, order-independent sums across blocks and MPI ranks.

Floating-point addition is not associative, so summing per-rank partial
gradients gives different bits for different rank counts. Here every summand
is one fixed-size *block*'s contribution, whose bits do not depend on the rank
count. Each part (a gradient tensor, a vector of statistics) gets one scale
agreed by all ranks, ``2**(S - e)``, where ``2**e`` bounds the part's largest
|value| on any rank and ``S = 52 - ceil(log2(total_blocks))``. Scaled values
are rounded to integers held in float64; a sum of ``total_blocks`` of them
stays below 2**53, where float64 integer addition is exact in any order. So
per-rank sums and the MPI ``Allreduce(SUM)`` give the same numbers whatever
the partition. The resolution is 2**-S of the largest block value (2**-49 for
8 blocks): far finer than float32 and about float64's own rounding of a sum.

Cost per call: one ``Allreduce(MAX)`` of len(parts)+1 int64, one scaling pass
over the local blocks, and one ``Allreduce(SUM)`` of a single preallocated
float64 buffer holding every part.
"""

import time

import numpy as np
from mpi4py import MPI

EMPTY = -(2**40)  # exponent of a part with no nonzero values on this rank
MIN_EXP = -900    # parts below 2**-900 count as zero (keeps 2**shift finite)


class NonFiniteError(ArithmeticError):
    """Some rank produced a NaN or infinity in a part to be summed."""


class ExactSum:
    """Sum per-block parts across ranks exactly; reuse one instance per set of shapes.

    ``shapes`` are the per-block shapes of the parts (without the block axis).
    """

    def __init__(self, shapes, comm=MPI.COMM_SELF):
        self.comm = comm
        self.shapes = [tuple(s) for s in shapes]
        sizes = [int(np.prod(s)) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.buffer = np.zeros(self.offsets[-1], dtype=np.float64)
        self.total = np.zeros_like(self.buffer)
        self.exps = np.zeros(len(self.shapes) + 1, dtype=np.int64)
        self.max_exps = np.zeros_like(self.exps)
        self.seconds = 0.0  # time spent in the last call (scaling and both Allreduces)

    def __call__(self, parts, total_blocks):
        """Return the exact global sums over the block axis of every part, as float64.

        ``parts[k]`` has shape (local_blocks, *shapes[k]); ``total_blocks`` is the
        number of blocks over all ranks (it sets the headroom).
        """
        start = time.perf_counter()
        self._agree_exponents(parts)
        bits = 52 - max(int(total_blocks) - 1, 0).bit_length()
        shifts = [bits - int(e) for e in self.max_exps[:-1]]
        for k, part in enumerate(parts):
            view = self.buffer[self.offsets[k]:self.offsets[k + 1]]
            if part.shape[0] == 0:
                view[:] = 0
                continue
            grid = np.multiply(part, 2.0 ** shifts[k], dtype=np.float64)
            np.rint(grid, out=grid)
            np.sum(grid.reshape(part.shape[0], -1), axis=0, out=view)
        self.comm.Allreduce(self.buffer, self.total, op=MPI.SUM)
        self.seconds = time.perf_counter() - start
        return [np.ldexp(self.total[self.offsets[k]:self.offsets[k + 1]], -shifts[k]).reshape(shape)
                for k, shape in enumerate(self.shapes)]

    def _agree_exponents(self, parts):
        nonfinite = 0
        for k, part in enumerate(parts):
            peak = float(np.max(np.abs(part))) if part.size else 0.0
            if not np.isfinite(peak):
                nonfinite = 1
            self.exps[k] = max(np.frexp(peak)[1], MIN_EXP) if 0 < peak < np.inf else EMPTY
        self.exps[-1] = nonfinite
        self.comm.Allreduce(self.exps, self.max_exps, op=MPI.MAX)
        if self.max_exps[-1]:
            raise NonFiniteError("a NaN or infinity appeared in the loss or gradients")
        self.max_exps[:-1][self.max_exps[:-1] == EMPTY] = 0
