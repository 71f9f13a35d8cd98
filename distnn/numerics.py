"""The start-up check: every rank computes distnn's arithmetic to the reference bits.

distnn's results are the same on every machine because they use only
operations whose IEEE-754 result is fixed. That holds only where the
arithmetic is IEEE-754 with round-to-nearest and gradual underflow: a library
that switched on flush-to-zero, or a platform that rounds otherwise, computes
other bits, and a job with such a rank would silently give another result.
So before a run each rank computes a small fixed sample of everything
training uses (products, each activation and loss, the functions, the random
draws, the learning rates and the momentum update) in float32 and float64, and the ranks compare its SHA-256 with the
reference below.
"""

import hashlib
import socket

import numpy as np

from distnn import activations, compiled, fixedmath, losses, optim, schedule
from distnn.errors import UserError
from distnn.products import product
from distnn.rng import Stream

# the sample's SHA-256 on IEEE-754 arithmetic (tests/test_numerics.py recomputes it under
# other SIMD paths, BLAS thread counts and the oldest supported numpy)
REFERENCE = "159995a0bbc65e4770ef2e2773cd8b73693fc3b49b221eeb88070e5f1c5f45d8"


def sample_digest():
    """SHA-256 of a fixed computation through every function training uses."""
    h = hashlib.sha256()
    stream = Stream(2026)
    z64 = stream.uniform_range(-30.0, 30.0, (16, 24))
    z64[0, :4] = (-745.0, -740.0, 709.0, 0.0)        # exp's underflow (subnormal) and overflow edges
    pixels = np.floor(stream.uniform_range(0.0, 256.0, (16, 24)))
    halves = stream.uniform_range(0.5, 1.0, (16, 24))
    targets = np.eye(24)[stream.permutation(24)[:16]]
    for dtype in (np.float32, np.float64):
        z, W = z64.astype(dtype), stream.normal((24, 24), 0.1).astype(dtype)
        # subnormal numbers, which flush-to-zero would make 0
        tiny = halves.astype(dtype) * dtype(2.0 ** (-140 if dtype == np.float32 else -1060))
        values = [product(z, W, dtype), product(pixels, W, dtype, integer_bits=8),
                  product(tiny, W, dtype), tiny * dtype(0.75)]
        values += [f(z) for f, _ in activations.ACTIVATIONS.values()]
        values += [fixedmath.log1p(np.abs(z)), fixedmath.log(np.abs(z))]
        y = losses.output("ce", z)
        values += [y, fixedmath.row_sum(z)]
        values += [losses.per_sample_loss(loss, z, losses.output(loss, z), targets.astype(dtype))
                   for loss in losses.LOSSES]
        params, grads = [(W.copy(), z[0].copy())], [(W[::-1].copy(), z[1].copy())]
        velocity = [(W * dtype(0.5), z[2].copy())]  # one momentum + decay update, in place
        values += [*optim.update(params, grads, velocity, 0.3, 0.9, True, 1e-3)[0], *velocity[0]]
        for v in values:
            h.update(np.ascontiguousarray(v).tobytes())
    rates = [schedule.Schedule(0.7, kind, warmup_steps=5, decay_steps=3, decay_factor=0.3,
                               total_steps=40) for kind in schedule.SCHEDULES]
    h.update(np.array([r.rate(t) for r in rates for t in range(41)]).tobytes())
    return h.hexdigest()


def check(comm):
    """Refuse to start (UserError, agreed) when a rank's sample differs from the reference."""
    everyone = comm.allgather((sample_digest(), socket.gethostname(), compiled.bad_choice()))
    bad = next(((rank, why) for rank, (_, _, why) in enumerate(everyone) if why), None)
    if bad:
        raise UserError(f"{'' if bad[0] == 0 else f'rank {bad[0]}: '}{bad[1]}", agreed=True)
    odd = [f"rank {rank} on {host}" for rank, (digest, host, _) in enumerate(everyone)
           if digest != REFERENCE]
    if odd:
        raise UserError(f"numerics check failed on {', '.join(odd)}: its arithmetic gives other "
                        "bits than IEEE-754 round-to-nearest without flush-to-zero (a library "
                        "that changes the floating-point mode?); refusing to start", agreed=True)
