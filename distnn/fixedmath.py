"""Transcendental functions with fixed result bits.

numpy's ``exp``, ``log``, ``tanh``... give bits that depend on the SIMD loop numpy
dispatches to (AVX2, AVX-512, SVML; the libm once ``NPY_DISABLE_CPU_FEATURES`` turns them
off), on the numpy version and on the platform's libm. These versions use only operations
whose IEEE-754 result is exact or correctly rounded: ``+ - * /``, comparisons, ``where``,
``minimum``/``maximum``/``clip``, ``abs``, ``copysign``, ``frexp``, adding 1.5 * 2**52 to
round to an integer, and integer bit manipulation to build powers of two; numpy never
fuses a multiply-add in elementwise loops. A result thus depends only on IEEE-754 double
arithmetic with round-to-nearest and no flush-to-zero: it is the same on every such
machine and numpy version (tested: 1.24 and 2.x, SIMD on and off). NaN results are NaN,
their sign and payload bits not fixed. Row sums are taken strictly left to right.

Everything is computed in float64, a few thousand elements at a time, and rounded once to
the input's dtype; float32 inputs use shorter polynomials (error below 2**-34 before that
rounding). Largest error seen, in ulps, over tens of millions of float64 arguments: exp
0.9, expm1 1.3, log 0.9, log1p 0.9, tanh 1.95, sigmoid 1.9, softplus 1.6. float32 results
are within 1 ulp of the correctly rounded value, and equal to it for all but about 1 in
40,000 arguments (log, log1p, softplus; none seen for the others).
"""

import functools
import math

import numpy as np

from distnn.compiled import flat, kernel

LN2_HI = float.fromhex("0x1.62e42fee00000p-1")  # fdlibm: n * LN2_HI is exact for |n| < 2**11
LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")
INV_LN2 = float.fromhex("0x1.71547652b82fep+0")
SQRT_HALF = float.fromhex("0x1.6a09e667f3bcdp-1")
SHIFT = float.fromhex("0x1.8p52")  # v + SHIFT rounds v to an integer held in the low bits
BIAS = 1023 - (0x4338000000000000 >> 1)  # (SHIFT's bits + n) >> 1, plus BIAS: n//2 + 1023
# fdlibm e_exp.c P1..P5: expm1(r) = r + r*c/(2 - c), c = r - z*(P1 + z*P2 + ...), z = r*r.
EXP_P = tuple(map(float.fromhex, (
    "0x1.555555555553ep-3", "-0x1.6c16c16bebd93p-9", "0x1.1566aaf25de2cp-14",
    "-0x1.bbd41c5d26bf1p-20", "0x1.6376972bea4d0p-25")))
# fdlibm e_log.c Lg1..Lg7: log(1 + f) = 2s + s*z*(Lg1 + z*Lg2 + ...), s = f/(2 + f), z = s*s.
LOG_LG = tuple(map(float.fromhex, (
    "0x1.5555555555593p-1", "0x1.999999997fa04p-2", "0x1.2492494229359p-2",
    "0x1.c71c51d8e78afp-3", "0x1.7466496cb03dep-3", "0x1.39a09d078c69fp-3",
    "0x1.2f112df3e5244p-3")))
TERMS = {False: (5, 7), True: (4, 5)}  # (EXP_P, LOG_LG) terms for float64 / float32 results
BLOCK = 16384  # elements per pass: temporaries stay in cache and come from malloc's heap


def _poly(z, coefs):
    """z*c0 + z**2*c1 + ... by Horner's rule."""
    p = z * coefs[-1]
    for c in coefs[-2::-1]:
        p += c
        p *= z
    return p


def _exp(x, single, minus_one=False):
    """e**x, or e**x - 1 with ``minus_one``: x = n*ln2 + r, fdlibm's expm1(r), times 2**n
    as 2**(n//2) * 2**(n - n//2) so that a subnormal result is rounded only once."""
    x = np.clip(x, -60.0 if minus_one else -746.0, 710.0)  # results saturate; NaN stays
    t = x * INV_LN2
    t += SHIFT
    n = t - SHIFT                         # rint(x / ln2)
    hi = np.subtract(x, n * LN2_HI, out=x)  # exact
    lo = np.multiply(n, LN2_LO, out=n)
    r = hi - lo
    c = _poly(r * r, EXP_P[:TERMS[single][0]])
    np.subtract(r, c, out=c)
    r *= c
    r /= np.subtract(2.0, c, out=c)
    r -= lo                               # expm1(r) = hi + r (fdlibm: hi - (lo - r*c/(2 - c)))
    bits = t.view(np.int64)               # SHIFT's bits + n
    half = bits >> 1
    bits -= half
    s1 = ((half + BIAS) << 52).view(np.float64)
    s2 = ((bits + BIAS) << 52).view(np.float64)
    if minus_one:                         # 1 - 2**-n is exact, and so is hi + it for n in [-1, 52]
        hi += 1.0 - 1.0 / s1 / s2
        r += hi
    else:
        r += hi
        r += 1.0
    r *= s1
    r *= s2
    return r


def _log(x, single, c=None):
    """log(x), or log(x) + c for a correction c much smaller than the result's ulp
    (log1p's): x = 2**k * (1 + f), 1 + f in [sqrt(1/2), sqrt(2)), fdlibm's log(1 + f)."""
    m, k = np.frexp(x)                    # exact, subnormal x too
    low = m < SQRT_HALF
    f = m + m * low
    f -= 1.0                              # exact
    k = np.subtract(k, low, dtype=np.float64)
    s = f + 2.0
    np.divide(f, s, out=s)
    r = _poly(s * s, LOG_LG[:TERMS[single][1]])
    hfsq = f * f
    hfsq *= 0.5
    r += hfsq
    r *= s
    r += k * LN2_LO if c is None else k * LN2_LO + c
    np.subtract(hfsq, r, out=r)
    r -= f
    k *= LN2_HI
    k -= r                                # k*LN2_HI - ((hfsq - (s*(hfsq + R) + k*LN2_LO + c)) - f)
    bad = ~(x > 0) | (x == np.inf)
    if bad.any():                         # log(0) = -inf, log(inf) = inf, NaN below 0
        xb = x[bad]
        k[bad] = np.where(xb == 0, -np.inf, np.where(xb > 0, xb, np.nan))
    return k


def _log1p(x, single):
    u = x + 1.0
    return _log(u, single, (x - (u - 1.0)) / u)  # log(1 + x) = log(u) + (x - (u - 1)) / u


def _divide_sum(num, a, b):
    """num / (a + b), the rounding of a + b compensated: exactly while b's exponent is at
    most a's (Fast2Sum), approximately otherwise."""
    d = a + b
    err = (a - d) + b                     # a + b == d + err
    num /= d
    num -= err / d * num
    return num


def _tanh(x, single):
    a = np.minimum(np.abs(x), 20.0)       # tanh(20) rounds to 1
    a *= 2.0
    large = a > 1.1
    t = _exp(a, single, minus_one=True)   # <= 2.01 where not large
    y = _divide_sum(np.where(large, 2.0, t), 2.0, t)
    np.subtract(large, y, out=y)          # large: 1 - 2/(t + 2), else -t/(t + 2): sign set next
    return np.copysign(y, x, out=y)


def _sigmoid(x, single):
    e = _exp(-np.abs(x), single)
    return _divide_sum(np.where(x < 0, e, 1.0), 1.0, e)


F32 = np.float32
# fdlibm e_expf.c, as decimal literals
EXPF_LN2_HI, EXPF_LN2_LO, EXPF_INV_LN2 = F32("6.9314575195e-01"), F32("1.4286067653e-06"), \
    F32("1.4426950216e+00")
EXPF_P1, EXPF_P2 = F32("1.6666625440e-01"), F32("-2.7667332906e-03")
TWO_M64 = F32(2.0 ** -64)


def _sigmoid32(x, single=True):
    """Sigmoid in float32 arithmetic (the default hidden layer's, twice as fast as through
    float64): fdlibm's expf of -|x| (k*ln2_hi exact), its 2**k built from bits as
    2**(k+64) * 2**-64 so a subnormal result is rounded once; within 2.3 ulp."""
    t = np.abs(x)
    np.negative(t, out=t)
    np.fmax(t, F32(-104), out=t)          # below e**-104 the result is 0; NaN becomes -104
    k = np.rint(t * EXPF_INV_LN2)
    hi = t - k * EXPF_LN2_HI
    lo = k * EXPF_LN2_LO
    r = hi - lo
    z = r * r
    c = z * EXPF_P2
    c += EXPF_P1
    c *= z
    np.subtract(r, c, out=c)
    r *= c
    r /= F32(2) - c
    np.subtract(lo, r, out=r)
    r -= hi
    np.subtract(F32(1), r, out=r)         # e**t = 1 - ((lo - r*c/(2 - c)) - hi)
    r *= ((k.astype(np.int32) + 191) << 23).view(F32)
    r *= TWO_M64
    y = np.where(x < 0, r, F32(1))
    y /= r + F32(1)
    return np.where(x == x, y, x)


@kernel
def _sigmoid32_kernel(x, out):
    """_sigmoid32 on 1-d float32 ``x`` into ``out``, one element at a time (the same
    operations in the same order: the same bits)."""
    for i in range(x.size):
        xi = x[i]
        t = -abs(xi)
        if not t >= F32(-104):            # np.fmax: NaN becomes -104
            t = F32(-104)
        k = np.rint(t * EXPF_INV_LN2)
        hi = t - k * EXPF_LN2_HI
        lo = k * EXPF_LN2_LO
        r = hi - lo
        z = r * r
        c = r - (z * EXPF_P2 + EXPF_P1) * z
        r = r * c / (F32(2) - c)
        r = F32(1) - ((lo - r) - hi)
        r = r * np.int32((np.int32(k) + np.int32(191)) << np.int32(23)).view(F32) * TWO_M64
        y = (r if xi < 0 else F32(1)) / (r + F32(1))
        out[i] = y if xi == xi else xi


def _softplus(x, single):
    y = _log1p(_exp(-np.abs(x), single), single)
    y += np.maximum(x, 0.0)
    return y


def _apply(fn, z, over_rows=False, wide=True):
    """``fn(float64 block, single)`` on blocks of z's elements (as a column) or of its
    rows (the last axis); the results rounded to z's dtype, in z's shape. With
    ``wide=False`` the blocks keep z's dtype."""
    z = np.asarray(z)
    if z.dtype not in (np.float32, np.float64):
        raise TypeError(f"fixedmath needs float32 or float64, not {z.dtype}")
    rows = z.reshape(math.prod(z.shape[:-1]), z.shape[-1]) if over_rows else z.reshape(-1, 1)
    out = np.empty(rows.shape, z.dtype)
    step = max(1, BLOCK // max(1, rows.shape[1]))
    with np.errstate(all="ignore"):
        for i in range(0, len(rows), step):
            block = rows[i:i + step]
            out[i:i + step] = fn(block.astype(np.float64) if wide else block,
                                 z.dtype == np.float32)
    return out.reshape(z.shape)


def exp(x):
    """e**x; subnormal results, 0 from -745.2 down, inf from 709.8 up."""
    return _apply(_exp, x)


def expm1(x):
    """e**x - 1, accurate near 0; -1 from -38 down, -0.0 at -0.0."""
    return _apply(lambda v, single: np.copysign(_exp(v, single, True), v), x)


def log(x):
    """Natural log: -inf at 0, NaN below 0, subnormal arguments handled."""
    return _apply(_log, x)


def log1p(x):
    """log(1 + x), accurate near 0: -inf at -1, NaN below -1, -0.0 at -0.0."""
    return _apply(lambda v, single: np.copysign(_log1p(v, single), v), x)


def tanh(x):
    """tanh from t = expm1(2|x|): t/(t + 2) below |x| = 0.55, 1 - 2/(t + 2) above."""
    return _apply(_tanh, x)


def sigmoid(x):
    """1 / (1 + e**-x), as e**x / (1 + e**x) below 0: accurate in both tails."""
    if np.asarray(x).dtype == np.float32:
        if _sigmoid32_kernel:
            out = np.empty(np.shape(x), F32)
            _sigmoid32_kernel(flat(x), out.reshape(-1))
            return out
        return _apply(_sigmoid32, x, wide=False)
    return _apply(_sigmoid, x)


def softplus(x):
    """log(1 + e**x) as max(x, 0) + log1p(e**-|x|)."""
    return _apply(_softplus, x)


def row_sum(x):
    """Sum over the last axis strictly left to right, in x's dtype; shape x.shape[:-1]."""
    x = np.asarray(x)
    if x.shape[-1] == 0:
        return np.zeros(x.shape[:-1], x.dtype)
    acc = x[..., 0].copy()
    for j in range(1, x.shape[-1]):
        acc += x[..., j]
    return acc


def _softmax(rows, single, log=False):
    rows -= rows.max(axis=-1, keepdims=True, initial=-np.inf)
    e = _exp(rows, single)
    if log:
        rows -= _log(row_sum(e), single)[:, None]
        return rows
    e /= row_sum(e)[:, None]
    return e


@kernel
def _exp_kernel(x, terms):
    """_exp of one float64 (not minus_one), the same operations in the same order."""
    if x < -746.0:
        x = -746.0
    elif x > 710.0:
        x = 710.0
    t = x * INV_LN2 + SHIFT
    n = t - SHIFT
    hi = x - n * LN2_HI
    lo = n * LN2_LO
    r = hi - lo
    z = r * r
    c = z * EXP_P[terms - 1]
    for i in range(terms - 2, -1, -1):
        c = (c + EXP_P[i]) * z
    c = r - c
    r = r * c / (2.0 - c) - lo
    bits = np.float64(t).view(np.int64)
    half = bits >> 1
    s1 = np.int64((half + BIAS) << 52).view(np.float64)
    s2 = np.int64((bits - half + BIAS) << 52).view(np.float64)
    return (r + hi + 1.0) * s1 * s2


@kernel
def _log_kernel(x, terms):
    """_log of one float64 (no correction), the same operations in the same order."""
    if not x > 0 or x == np.inf:
        return -np.inf if x == 0 else (x if x > 0 else np.nan)
    m, k = math.frexp(x)
    low = 1.0 if m < SQRT_HALF else 0.0
    f = (m + m * low) - 1.0
    kf = k - low
    s = f / (f + 2.0)
    z = s * s
    r = z * LOG_LG[terms - 1]
    for i in range(terms - 2, -1, -1):
        r = (r + LOG_LG[i]) * z
    hfsq = f * f * 0.5
    r = (r + hfsq) * s + kf * LN2_LO
    return kf * LN2_HI - ((hfsq - r) - f)


@kernel
def _softmax_kernel(z, log, exp_terms, log_terms, out):
    """_softmax over the rows of 2-d ``z`` into ``out`` (z's dtype), row by row."""
    e = np.empty(z.shape[1])
    for i in range(z.shape[0]):
        peak = -np.inf
        for j in range(z.shape[1]):
            v = np.float64(z[i, j])
            if v > peak or v != v:
                peak = v if peak == peak else peak
        total = 0.0
        for j in range(z.shape[1]):
            e[j] = _exp_kernel(np.float64(z[i, j]) - peak, exp_terms)
            total = e[j] if j == 0 else total + e[j]
        if log:
            shift = _log_kernel(total, log_terms)
            for j in range(z.shape[1]):
                out[i, j] = (np.float64(z[i, j]) - peak) - shift
        else:
            for j in range(z.shape[1]):
                out[i, j] = e[j] / total


def _softmax_rows(z, log):
    """softmax or log_softmax of ``z`` over its last axis: the compiled twin where there is
    one, else the reference, _softmax, in blocks of rows."""
    z = np.asarray(z)
    if not _softmax_kernel or z.dtype not in (np.float32, np.float64) or not z.shape[-1]:
        return _apply(functools.partial(_softmax, log=log), z, over_rows=True)
    rows = np.ascontiguousarray(z).reshape(-1, z.shape[-1])
    out = np.empty(rows.shape, z.dtype)
    exp_terms, log_terms = TERMS[z.dtype == np.float32]
    _softmax_kernel(rows, log, exp_terms, log_terms, out)
    return out.reshape(z.shape)


def softmax(z):
    """exp(z - max) / row_sum of that, over the last axis."""
    return _softmax_rows(z, log=False)


def log_softmax(z):
    """(z - max) - log(row_sum(exp(z - max))), over the last axis."""
    return _softmax_rows(z, log=True)
