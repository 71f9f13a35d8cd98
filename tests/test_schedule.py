"""Learning-rate schedules against their textbook formulas, and distnn's own cosine."""

import hashlib
import math
import struct

import numpy as np
import pytest

from distnn.config import Config
from distnn.schedule import Schedule, cos_pi, power, steps_of


def ulps(a, b):
    """Distance between two doubles in units in the last place."""
    def ordinal(x):
        i = struct.unpack("<q", struct.pack("<d", x))[0]
        return i if i >= 0 else -(i & 0x7FFFFFFFFFFFFFFF)
    return abs(ordinal(a) - ordinal(b))


def test_cos_pi_is_within_two_ulp_of_a_long_double_reference():
    """The reference reduces t exactly (0.5 - t, 1 - t) and multiplies by pi in long
    double; math.cos(math.pi * t) would not do: its rounded argument alone is off by up
    to 3 ulp of the result near t = 3/4, and by far more near t = 1/2."""
    ts = np.linspace(0.0, 1.0, 100_001)
    pi, t = np.longdouble("3.14159265358979323846264338327950288"), ts.astype(np.longdouble)
    exact = np.where(t <= 0.25, np.cos(pi * t),
                     np.where(t <= 0.75, np.sin(pi * (0.5 - t)), -np.cos(pi * (1 - t))))
    ours = np.array([cos_pi(float(t)) for t in ts])
    error = np.abs(ours.astype(np.longdouble) - exact)
    assert (error <= 2 * np.spacing(np.abs(exact).astype(np.float64)).astype(np.longdouble)).all()
    assert (cos_pi(0.0), cos_pi(0.5), cos_pi(1.0)) == (1.0, 0.0, -1.0)


def test_cos_pi_bits_are_fixed():
    """The same bits on every machine: a digest taken once, not from the C library."""
    values = [cos_pi(t / 65536) for t in range(65537)]
    digest = hashlib.sha256(struct.pack(f"<{len(values)}d", *values)).hexdigest()
    assert digest == "a864ebb40cbbf6d0046aabeb5283a1a88556aaab70d6adfdaf67ea73dcd671f6"


def test_cos_pi_refuses_arguments_outside_its_range():
    with pytest.raises(ValueError):
        cos_pi(1.5)


def textbook(t, lr, kind, warmup=0, every=1, gamma=1.0, total=1):
    """rate(t) written the way the texts write it (math.cos, **)."""
    decay = {"constant": 1.0, "step": gamma ** (t // every),
             "cosine": 0.5 * (1 + math.cos(math.pi * t / total))}[kind]
    warm = (t + 1) / warmup if t < warmup else 1.0
    return lr * decay * warm


@pytest.mark.parametrize("kind, warmup", [("constant", 0), ("constant", 7), ("step", 0),
                                          ("step", 5), ("cosine", 0), ("cosine", 12)])
def test_rates_follow_the_textbook_formulas(kind, warmup):
    schedule = Schedule(lr=0.8, kind=kind, warmup_steps=warmup, decay_steps=9,
                        decay_factor=0.3, total_steps=60)
    for t in range(60):
        assert schedule.rate(t) == pytest.approx(
            textbook(t, 0.8, kind, warmup, 9, 0.3, 60), rel=1e-13)


def test_warmup_rises_linearly_to_the_peak_then_the_cosine_falls_to_zero():
    schedule = Schedule(lr=1.5, kind="cosine", warmup_steps=10, total_steps=100)
    rates = [schedule.rate(t) for t in range(100)]
    assert rates[0] == pytest.approx(0.15 * 0.5 * (1 + math.cos(0)))
    assert rates[9] == pytest.approx(1.5 * 0.5 * (1 + math.cos(math.pi * 9 / 100)))
    assert all(a < b for a, b in zip(rates[:10], rates[1:10]))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert 0 < rates[-1] < 1e-3


def test_epoch_lengths_become_steps():
    cfg = Config(lr=0.5, schedule="step", warmup=0.5, decay_every=1.5, decay_factor=0.5, epochs=4)
    schedule = Schedule.of(cfg, steps_per_epoch=11)
    assert (schedule.warmup_steps, schedule.decay_steps, schedule.total_steps) == (6, 17, 44)
    assert steps_of(0.01, 11) == 1  # never zero steps
    assert schedule.rate(16) == 0.5 and schedule.rate(17) == 0.25 and schedule.rate(34) == 0.125


def test_step_decay_takes_powers_by_squaring_at_any_step():
    """gamma ** k in O(log k) products: a late step of a long run costs no more than an early one."""
    assert power(0.5, 0) == 1.0 and power(0.5, 10) == 0.5 ** 10 and power(3.0, 5) == 243.0
    assert power(0.9, 1000) == pytest.approx(0.9 ** 1000, rel=1e-13)
    schedule = Schedule(lr=0.4, kind="step", decay_steps=1, decay_factor=1.0)
    assert schedule.rate(10**15) == 0.4
    assert Schedule(lr=0.4, kind="step", decay_steps=1, decay_factor=0.5).rate(10**15) == 0.0
