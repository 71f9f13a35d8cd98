"""distnn.timing: the step timer's phases, and the Allreduce calls it counts as comm."""

import time

import numpy as np
from mpi4py import MPI

from distnn.timing import PHASES, StepTimer, TimedComm


def test_timed_comm_counts_its_allreduce_calls_and_bytes():
    timed = TimedComm(MPI.COMM_SELF)
    out = np.zeros(4)
    timed.Allreduce(np.arange(4.0), out, op=MPI.SUM)
    timed.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
    assert np.array_equal(out, np.arange(4.0))
    assert timed.bytes == 64 and timed.seconds > 0
    assert timed.size == 1 and timed.rank == 0  # the rest is the wrapped communicator's


def test_a_step_splits_into_data_compute_and_comm():
    timed = TimedComm(MPI.COMM_SELF)
    timer = StepTimer(timed)
    start = time.perf_counter()
    for _ in range(3):
        timer.start()
        time.sleep(0.01)                                                 # reading the batch
        timer.loaded()
        time.sleep(0.02)                                                 # the arithmetic
        timed.Allreduce(np.zeros(1000), np.zeros(1000), op=MPI.SUM)      # the exchange
        timer.stepped()
    wall = time.perf_counter() - start
    seconds = timer.seconds
    assert set(seconds) == set(PHASES) and timer.bytes == 3 * 8000
    assert seconds["data"] >= 0.03 and seconds["compute"] >= 0.06
    assert seconds["comm"] == timed.seconds  # every Allreduce of the steps, and nothing else
    assert 0.09 <= sum(seconds.values()) <= wall  # the phases cover the steps, once
    timer.reset()
    assert timer.bytes == 0 and not any(timer.seconds.values())
