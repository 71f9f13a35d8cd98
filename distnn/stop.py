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
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The stop signal this process received (``signum``, 0 if none)."""

    def __init__(self):
        self.signum = 0
        self.installed = False
        self.waiting_for = None  # what an interruptible wait opens (None: not waiting)

    def install(self):
        """Catch the stop signals (again); a signal caught earlier is kept."""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
            signal.siginterrupt(sig, False)  # restart system calls (file writes, MPI waits)
        self.installed = True
        return self

    @contextmanager
    def interruptible(self, what):
        """While inside, a stop signal ends the wait at once (a Stopped exception naming
        ``what``) instead of waiting for the step boundary: for opening an input, which
        blocks for ever when the input turns out to be a FIFO. Nothing else happens in
        such a section, so nothing is left half-done."""
        if not self.installed:
            yield
            return
        self.waiting_for = what
        for sig in SIGNALS:
            signal.siginterrupt(sig, True)  # the blocked open() returns EINTR to Python
        try:
            if self.signum:
                self._handle(self.signum, None)
            yield
        finally:
            self.waiting_for = None
            for sig in SIGNALS:
                signal.siginterrupt(sig, False)

    def ignore(self):
        """Ignore the stop signals from now on: the run's outcome is already decided."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        if self.waiting_for is not None:
            from distnn.errors import Stopped
            raise Stopped(f"{signal.Signals(signum).name} received while opening "
                          f"{self.waiting_for}; stopped before training, nothing was written")


REQUEST = StopRequest()
