"""Learning-rate schedules: the rate of every step as a function of the step alone.

``rate(t)`` is the rate of the update that takes a run from step ``t`` to
``t + 1`` (``t`` from 0)::

    rate(t) = lr * decay(t) * warm(t)
    warm(t) = (t + 1) / W while t < W, else 1           (--warmup: W steps)
    decay(t) = 1                                          constant
               gamma ** floor(t / D)                      step (--decay-every: D steps)
               (1 + cos(pi * t / T)) / 2                  cosine (T: the run's steps)

Epoch lengths in the flags (fractions allowed) become whole steps here:
``E * steps_per_epoch`` rounded half up, at least one. ``gamma ** k`` is
taken by repeated squaring, a fixed sequence of products. The arithmetic is Python's
IEEE-754 doubles, one operation at a time, and the cosine is distnn's own
(fdlibm's kernels), not the C library's, so every machine computes the same
rate bits: a rate is part of the cross-machine guarantee like any product.
"""

import dataclasses

SCHEDULES = ("constant", "step", "cosine")

PI = 3.14159265358979311600e+00  # the double nearest pi

# fdlibm's (FreeBSD k_sin.c, k_cos.c) minimax polynomials on [-pi/4, pi/4]
S1, S2, S3 = -1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04
S4, S5, S6 = 2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10
C1, C2, C3 = 4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05
C4, C5, C6 = -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11


def _sin_kernel(x):
    """sin(x) for |x| <= pi/4 (fdlibm's __kernel_sin with no tail)."""
    z = x * x
    w = z * z
    r = S2 + z * (S3 + z * S4) + z * w * (S5 + z * S6)
    return x + z * x * (S1 + z * r)


def _cos_kernel(x):
    """cos(x) for |x| <= pi/4 (fdlibm's __kernel_cos with no tail)."""
    z = x * x
    w = z * z
    r = z * (C1 + z * (C2 + z * C3)) + w * w * (C4 + z * (C5 + z * C6))
    hz = 0.5 * z
    w = 1.0 - hz
    return w + (((1.0 - w) - hz) + z * r)


def cos_pi(t):
    """cos(pi * t) for 0 <= t <= 1, within two ulp, the same bits everywhere.

    The reductions ``0.5 - t`` and ``1 - t`` are exact where they are used.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"cos_pi takes 0 <= t <= 1, got {t}")
    if t <= 0.25:
        return _cos_kernel(PI * t)
    if t <= 0.75:
        return _sin_kernel(PI * (0.5 - t))
    return -_cos_kernel(PI * (1.0 - t))


def steps_of(epochs, steps_per_epoch):
    """Whole steps in ``epochs`` (a fraction allowed; rounded half up), at least one."""
    return max(1, int(epochs * steps_per_epoch + 0.5))


def power(x, k):
    """x ** k for an integer k >= 0 by repeated squaring: O(log k) IEEE products, in an
    order fixed by k alone (not the C library's pow)."""
    result = 1.0
    while k:
        if k & 1:
            result = result * x
        x = x * x
        k >>= 1
    return result


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The rates of one run (all lengths in steps)."""
    lr: float
    kind: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 1       # step: decay every this many steps
    decay_factor: float = 1.0  # step: gamma
    total_steps: int = 1       # cosine: reaches zero after this many steps

    @classmethod
    def of(cls, cfg, steps_per_epoch):
        """The schedule of a run configured by ``cfg`` (a :class:`distnn.config.Config`)."""
        return cls(lr=cfg.lr, kind=cfg.schedule,
                   warmup_steps=steps_of(cfg.warmup, steps_per_epoch) if cfg.warmup else 0,
                   decay_steps=steps_of(cfg.decay_every, steps_per_epoch) if cfg.decay_every else 1,
                   decay_factor=cfg.decay_factor, total_steps=cfg.epochs * steps_per_epoch)

    def rate(self, t):
        """The learning rate of step ``t`` (0-based: the update from step t to t + 1)."""
        r = self.lr
        if self.kind == "step":
            r = r * power(self.decay_factor, t // self.decay_steps)
        elif self.kind == "cosine":
            r = r * (0.5 * (1.0 + cos_pi(min(t, self.total_steps) / self.total_steps)))
        if t < self.warmup_steps:
            r = r * (t + 1) / self.warmup_steps
        return r
