"""Stop at the next step boundary on SIGTERM or SIGUSR1.

Slurm (and other schedulers) send such a signal before a time limit or a
preemption; ``mpirun`` forwards it to every rank. The handler only sets a
flag; every step the ranks agree on it inside the ``Allreduce(MAX)`` that
agrees the exact sums' grids (``carry`` of :mod:`distnn.exact`), so stopping
costs no extra communication. They all stop after the same step, rank 0 writes
a checkpoint, and the job exits with code 75 (see :mod:`distnn.errors`) for
the job script to requeue.
"""

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The stop signal this rank received (``signum``, 0 if none)."""

    def __init__(self):
        self.signum = 0
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
        self.signum = signum
