"""Seeded random draws whose bits are the same with every numpy version.

numpy promises that a bit generator's raw output stays the same across
versions (PCG64 seeded through SeedSequence), but not the algorithms of
``Generator.normal``, ``uniform``, ``permutation`` or ``choice``, which may
change in any release. So distnn takes only raw 64-bit integers from PCG64
and turns them into its draws itself, with exact or correctly rounded
operations (+ - * / sqrt, integer operations, comparisons) and the
fixed-bits :func:`distnn.fixedmath.log`: the bits of every draw depend only
on the entropy, the order of the calls and their sizes.
"""

import math
import operator

import numpy as np

from distnn.fixedmath import log


class Stream:
    """A stream of draws from ``entropy``: an int or a tuple of ints such as
    ``(seed, epoch)``, each in [0, 2**64). Each call takes the next raw integers.

    SeedSequence alone gives ``(s, 0)`` the stream of ``s``, and ``2**32 * e + s`` that
    of ``(s, e)``; so each int becomes exactly two 32-bit words, followed by the count
    of ints: distinct entropies (``s`` and ``(s,)`` are the same) seed distinct streams."""

    def __init__(self, entropy):
        values = [operator.index(x) for x in (entropy if np.ndim(entropy) else [entropy])]
        if not all(0 <= x < 2 ** 64 for x in values):
            raise ValueError(f"random entropy must be ints in [0, 2**64), not {entropy!r}")
        words = [w for x in values for w in (x & 0xFFFFFFFF, x >> 32)] + [len(values)]
        self._bits = np.random.PCG64(np.random.SeedSequence(words))

    def uniform(self, size):
        """float64 in [0, 1): the top 53 bits of each raw integer times 2**-53 (exact)."""
        shape = _shape(size)
        raw = self._bits.random_raw(math.prod(shape))
        return ((raw >> np.uint64(11)).astype(np.float64) * 2.0 ** -53).reshape(shape)

    def uniform_range(self, lo, hi, size):
        """``lo + (hi - lo) * u`` for u from :meth:`uniform`: three correctly rounded
        float64 operations, so fixed bits; rounding may give exactly ``hi``."""
        lo, hi = float(lo), float(hi)
        return lo + (hi - lo) * self.uniform(size)

    def normal(self, size, std=1.0):
        """Normal draws of mean 0 and standard deviation ``std``, by Marsaglia's polar
        method: pairs (u, v) uniform in [-1, 1), kept when 0 < s = u*u + v*v < 1,
        give u * f and v * f with f = sqrt(-2 log(s) / s). Each round draws
        ``need * 4 // 3 + 16`` candidate pairs (about 4/3 of the pairs still needed:
        pi/4 of them are kept) and keeps the first accepted ones in order, so the
        result depends only on the stream and ``size``."""
        shape = _shape(size)
        n = math.prod(shape)
        need, parts = (n + 1) // 2, []
        while need > 0:
            u, v = (2.0 * self.uniform((need * 4 // 3 + 16, 2)) - 1.0).T   # exact
            s = u * u + v * v
            kept = (s > 0.0) & (s < 1.0)
            u, v, s = u[kept][:need], v[kept][:need], s[kept][:need]
            f = np.sqrt(-2.0 * log(s) / s)
            parts.append(np.stack([u * f, v * f], axis=1).ravel())
            need -= len(s)
        z = np.concatenate(parts)[:n] if parts else np.zeros(0)
        return (z * float(std)).reshape(shape)

    def permutation(self, n):
        """A uniformly random permutation of 0..n-1 (int64): the stable argsort of n raw
        64-bit keys. A stable sort's result is fixed by the keys alone; equal keys
        (probability about n**2 / 2**65) keep their positions' order."""
        return np.argsort(self._bits.random_raw(n), kind="stable").astype(np.int64)

    def choice(self, n, k):
        """``k`` distinct indices of 0..n-1 without replacement: the first k of
        :meth:`permutation`."""
        if not 0 <= k <= n:
            raise ValueError(f"cannot choose {k} distinct indices out of {n}")
        return self.permutation(n)[:k]


def _shape(size):
    return (int(size),) if np.ndim(size) == 0 else tuple(int(d) for d in size)
