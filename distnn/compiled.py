"""The optional compiled path: numba twins of the step's elementwise hot spots.

The numpy reference spends most of its non-GEMM time going over memory (the
float32 sigmoid alone is about 30 array passes). Where numba is installed
(the ``fast`` extra, also part of ``test``), a few functions have a twin
compiled by :func:`kernel` that does the same IEEE-754 operations on each
element, in the same order, in one loop. numba compiles without fast-math
(LLVM then neither fuses a multiply-add nor reorders), so every result is
bit for bit the reference's; tests/test_compiled.py checks that over millions
of arguments, and whole training runs on both paths. Each twin sits beside
its reference in the reference's module. ``DISTNN_KERNELS=numpy`` switches the
compiled path off; :data:`ACTIVE` names the path in use.
"""

import os

import numpy as np

CHOICES = ("auto", "numpy")
CHOICE = os.environ.get("DISTNN_KERNELS", "auto")
try:
    if CHOICE != "auto":  # numpy, or a mistake that numerics.check reports
        raise ImportError("switched off")
    import numba
except ImportError:
    numba = None

ACTIVE = "numba" if numba else "numpy"


def bad_choice():
    """The one-line complaint about DISTNN_KERNELS, or None when it is valid."""
    if CHOICE in CHOICES:
        return None
    return f"DISTNN_KERNELS={CHOICE!r}: choose {' or '.join(CHOICES)}"


def kernel(fn):
    """``fn`` (a loop over arrays) compiled by numba, cached on disk where numba finds a
    writable place for it (else compiled anew in each process); None without numba."""
    if numba is None:
        return None
    options = dict(nogil=True, error_model="numpy", fastmath=False)
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(**options)(fn)


def flat(x):
    """x as a 1-d C-contiguous array (a view where x is contiguous already)."""
    return np.ascontiguousarray(x).reshape(-1)
