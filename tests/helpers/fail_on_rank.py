"""Run distnn.train, but raise a RuntimeError on one rank at one step.

Usage: fail_on_rank.py RANK STEP [train flags...]. Used to prove that one
rank's exception ends the whole job promptly instead of hanging the others.
"""

import sys

from mpi4py import MPI

import distnn.train as train

RANK, STEP = int(sys.argv[1]), int(sys.argv[2])
real_step = train.train_step
calls = 0


def failing_step(*args, **kwargs):
    global calls
    calls += 1
    if MPI.COMM_WORLD.rank == RANK and calls == STEP:
        raise RuntimeError(f"deliberate failure on rank {RANK} at step {STEP}")
    return real_step(*args, **kwargs)


train.train_step = failing_step
train.main(sys.argv[3:])
