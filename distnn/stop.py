"""Stop at the next step boundary on SIGTERM or SIGUSR1.

Slurm (and other schedulers) send such a signal before a time limit or a
preemption; ``mpirun`` forwards it to every rank. The handler only sets a
flag; once per step the ranks agree on it with one ``Allreduce(MAX)``, so they
all stop after the same step, rank 0 writes a checkpoint, and the job exits
with code 75 (see :mod:`distnn.errors`) for the job script to requeue.
"""

import signal

import numpy as np
from mpi4py import MPI

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The signal flag of this rank and its per-step agreement across ranks."""

    def __init__(self, comm):
        self.comm = comm
        self.local = np.zeros(1, np.int64)
        self.agreed = np.zeros(1, np.int64)
        self.previous = {}

    def install(self):
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum, frame):
        self.local[0] = signum

    def requested(self):
        """The signal number some rank received (0 if none); collective."""
        self.comm.Allreduce(self.local, self.agreed, op=MPI.MAX)
        return int(self.agreed[0])
