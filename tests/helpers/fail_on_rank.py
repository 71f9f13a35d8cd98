"""Run distnn.train, but raise a RuntimeError on one rank at one step.

Usage: fail_on_rank.py RANK STEP [train flags...]. Used to prove that one
rank's exception ends the whole job promptly instead of hanging the others.
The failure is put into the trainer's step itself (:class:`distnn.step.Stepper`),
whatever module imports it.
"""

import sys

from mpi4py import MPI

from distnn import train
from distnn.step import Stepper

RANK, STEP = int(sys.argv[1]), int(sys.argv[2])
real_step = Stepper.__call__
calls = 0


def failing_step(self, *args, **kwargs):
    global calls
    calls += 1
    if MPI.COMM_WORLD.rank == RANK and calls == STEP:
        raise RuntimeError(f"deliberate failure on rank {RANK} at step {STEP}")
    return real_step(self, *args, **kwargs)


Stepper.__call__ = failing_step
train.main(sys.argv[3:])
