"""Matrix products whose result bits do not depend on the BLAS, the CPU or the batch.

A BLAS chooses its own summation order (by kernel, CPU, thread count and
matrix shape), so ``a @ W`` in floating point gives different bits on
different machines and even for a row alone versus inside a larger batch.
distnn's products are exact instead: both factors are rounded to integer
grids, the integer products are summed by one float64 GEMM, and as every
partial sum is an integer below 2**53 the sum is the same in any order. One
IEEE-rounded combination at the end makes the result.

The grids come only from things that are the same on every rank and for every
rank count: the left factor ``a`` (rows: a batch's samples) is scaled per row
by a power of two from that row's own largest |value|; the right factor ``W``
(parameters) per column from that column's largest |value|. For a product
summing ``K`` terms, ``budget = 53 - ceil(log2 K)`` bits are shared between
the two factors' integers:

==================  =====================  ==========================================
factor a            float32 run            float64 run
==================  =====================  ==========================================
pixels 0..255       8 bits: exact          8 bits: exact
                    W: budget - 8          W: two parts, 2 x (budget - 8)
                    (35 at K = 784)        (70 at K = 784: all of float64's 53)
anything else       a: budget - 24 bits    a and W each in two parts of
                    (21 at K = 256, 25 at  about budget / 2 bits (a 2 x 22,
                    K = 10; two parts      W 2 x 23 at K = 256); the product of
                    below 16 bits);        the two low parts (below 2**-44 of
                    W: 24 bits             the result) is left out
==================  =====================  ==========================================

"Bits" count from the row's (a) or column's (W) largest |value| down: a
weight near its column's largest keeps all 24 bits of a float32, a weight
2**-k below it keeps that many bits less. An a-part of ``b`` bits after the
first keeps ``b - 1`` (its sign takes one).
"""

import numpy as np

from distnn.compiled import kernel

GEMM = np.matmul  # GEMM(a, b, out=None) on integer-valued float64: any summation order, same bits
MIN_EXP, MAX_EXP = -900, 900  # exponents are clamped here so every 2**shift is a float64


def pow2(n):
    """2.0**n for an integer array n in [-1022, 1023], built from its bits (exact)."""
    return ((np.asarray(n, np.int64) + 1023) << 52).view(np.float64)


def ceil_log2(k):
    """The smallest c with k <= 2**c (0 for k <= 1): bits a sum of k terms can add."""
    return max(int(k) - 1, 0).bit_length()


def plan(terms, dtype, integer_bits=None):
    """(a_bits, a_parts, w_bits, w_parts) for products of ``terms`` summands (see the table);
    ``integer_bits`` when ``a`` holds integers below 2**integer_bits."""
    budget = 53 - ceil_log2(terms)
    double = np.dtype(dtype) == np.float64
    if integer_bits is not None:
        return integer_bits, 1, budget - integer_bits, 2 if double else 1
    if double:
        return budget // 2, 2, budget - budget // 2, 2
    a_bits = budget - 24
    return a_bits, 1 if a_bits >= 16 else 2, 24, 1


@kernel
def _peak_bits_kernel(bits, mask, axis, out):
    """max of ``bits & mask`` (2-d: a float array's bits, the mask clearing the sign) per
    row (axis 1) or column (axis 0) into ``out``: for floats without the sign, the integer
    order of their bits is their order, and every NaN's bits are above infinity's."""
    out[:] = 0
    for i in range(bits.shape[0]):
        if axis == 1:
            peak = out[i]
            for j in range(bits.shape[1]):
                peak = max(peak, bits[i, j] & mask)
            out[i] = peak
        else:
            for j in range(bits.shape[1]):
                out[j] = max(out[j], bits[i, j] & mask)


# a float dtype's bits as unsigned integers, and the mask that clears their sign
SIGN_CLEARED = {np.dtype(np.float32): (np.uint32, np.uint32(2**31 - 1)),
                np.dtype(np.float64): (np.uint64, np.uint64(2**63 - 1))}


def abs_peaks(x, axis):
    """max |x| per row (axis 1) or column (axis 0) of 2-d float ``x``, in float64 (NaN
    where one is NaN). The numpy reference takes max(max, -min)."""
    if _peak_bits_kernel:
        uint, mask = SIGN_CLEARED[x.dtype]
        out = np.empty(x.shape[1 - axis], uint)
        _peak_bits_kernel(np.ascontiguousarray(x).view(uint), mask, axis, out)
        return out.view(x.dtype).astype(np.float64)
    if not x.shape[axis]:
        return np.zeros(x.shape[1 - axis])
    return np.maximum(x.max(axis=axis), -x.min(axis=axis)).astype(np.float64)


def peak_exponents(x, axis):
    """Per row (axis 1) or column (axis 0): e with max|x| < 2**e, clamped to the range."""
    return np.clip(np.frexp(abs_peaks(x, axis))[1], MIN_EXP, MAX_EXP)


@kernel
def _split_kernel(x, rows, columns, bits, out):
    """split of 2-d ``x`` into ``out`` (parts, *x.shape), one or two parts, scaled by the
    per-row ``rows`` or else the per-column ``columns``."""
    step = 2.0 ** bits
    for i in range(x.shape[0]):
        if rows.size:
            for j in range(x.shape[1]):
                out[0, i, j] = np.float64(x[i, j]) * rows[i]
        else:
            for j in range(x.shape[1]):
                out[0, i, j] = np.float64(x[i, j]) * columns[j]
        if out.shape[0] == 1:
            for j in range(x.shape[1]):
                out[0, i, j] = np.rint(out[0, i, j])
        else:
            for j in range(x.shape[1]):
                q = np.rint(out[0, i, j])
                out[1, i, j] = np.rint((out[0, i, j] - q) * step)
                out[0, i, j] = q


def split(x, scale, bits, parts):
    """Integer-valued float64 parts q_0, q_1, ... with x * scale = q_0 + q_1 2**-bits + ...
    (to the last part's rounding); |x * scale| < 2**bits. ``scale`` is per row (rows, 1)
    or per column (1, columns)."""
    if _split_kernel and parts <= 2:
        out, none = np.empty((parts, *x.shape)), np.zeros(0)
        per_row = scale.shape == (x.shape[0], 1)
        _split_kernel(np.ascontiguousarray(x), scale.reshape(-1) if per_row else none,
                      none if per_row else scale.reshape(-1), bits, out)
        return list(out)
    rest = np.multiply(x, scale, dtype=np.float64)
    out = []
    for i in range(parts):
        if i + 1 == parts:
            out.append(np.rint(rest, out=rest))
            break
        q = np.rint(rest)
        out.append(q)
        rest -= q                      # exact: |rest - q| <= 1/2 on rest's own grid
        rest *= 2.0 ** bits            # exact
    return out


@kernel
def _unscale_kernel(total, columns, rows):
    """total *= columns (per column), then *= rows (per row) unless rows is empty."""
    for i in range(total.shape[0]):
        for j in range(total.shape[1]):
            total[i, j] *= columns[j]
        if rows.size:
            for j in range(total.shape[1]):
                total[i, j] *= rows[i]


def product(a, W, dtype, integer_bits=None, scale=1.0):
    """``a @ W * scale`` in float64, its bits fixed (see the module docstring); ``a``
    (rows, K), ``W`` (K, N). With ``integer_bits``, ``a`` holds integers below
    2**integer_bits (float64). ``scale`` multiplies each column's power of two
    first: one rounding, the same everywhere."""
    a_bits, a_parts, w_bits, w_parts = plan(W.shape[0], dtype, integer_bits)
    if integer_bits is None:
        a_shift = a_bits - peak_exponents(a, 1)
        a_split = split(a, pow2(a_shift)[:, None], a_bits, a_parts)
    else:
        a_split = [a]
    w_shift = w_bits - peak_exponents(W, 0)
    w_split = split(W, pow2(w_shift)[None, :], w_bits, w_parts)
    total = None
    for i, qa in enumerate(a_split):          # a fixed order: (0, 0), (0, 1), (1, 0), ...
        for j, qw in enumerate(w_split):
            if i + j >= max(a_parts, w_parts):
                continue
            term = GEMM(qa, qw)
            if i * a_bits + j * w_bits:
                term *= 2.0 ** -(i * a_bits + j * w_bits)
            total = term if total is None else np.add(total, term, out=total)
    columns = pow2(-w_shift) * scale
    if _unscale_kernel:
        _unscale_kernel(total, columns, np.zeros(0) if integer_bits is not None else pow2(-a_shift))
        return total
    total *= columns[None, :]
    if integer_bits is None:
        total *= pow2(-a_shift)[:, None]
    return total
