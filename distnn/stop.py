"""Stop at the next step boundary on SIGTERM or SIGUSR1; never die of one.

Slurm (and other schedulers) send such a signal before a time limit or a
preemption; ``mpirun`` and ``srun`` forward SIGUSR1 to every rank. The handler
only sets a flag; after every step the ranks agree on it with one 8-byte
``Allreduce(MAX)`` (:class:`distnn.parallel.SignalAgreement`). They all stop
after the same step, rank 0 writes a checkpoint, and the job exits with code 75
(see :mod:`distnn.errors`) for the job script to requeue.

The process-wide :data:`REQUEST` is installed as the very first thing
``python -m distnn.train`` does, before its slow imports (numpy, h5py,
``MPI_Init``), and again after ``MPI_Init`` (MPICH may install a SIGUSR1
handler of its own there). Once the outcome of a run is decided,
:meth:`StopRequest.ignore` makes both signals harmless for the rest of the
process's life: Python would otherwise restore their default action, which
kills, while the interpreter and MPI shut down.
"""

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The stop signal this process received (``signum``, 0 if none)."""

    def __init__(self):
        self.signum = 0

    def install(self):
        """Catch the stop signals (again); a signal caught earlier is kept."""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
            signal.siginterrupt(sig, False)  # restart system calls (file writes, MPI waits)
        return self

    def ignore(self):
        """Ignore the stop signals from now on: the run's outcome is already decided."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum


REQUEST = StopRequest()
