"""Stop at the next step boundary on a stop signal; never die of one.

The stop signals: SIGTERM and SIGUSR1, which Slurm (and other schedulers) send
before a time limit or a preemption (``mpirun`` forwards both to every rank,
``srun`` SIGUSR1); SIGINT, a user's Ctrl-C (``mpirun`` forwards it); SIGHUP, a
terminal or ssh session that closed. The handler only sets a flag; after every
step the ranks agree on it with one 8-byte ``Allreduce(MAX)``
(:class:`distnn.parallel.SignalAgreement`). They all stop after the same step,
rank 0 writes a checkpoint, and the job exits with code 75 for SIGTERM/SIGUSR1
(for the job script to requeue), 130 for SIGINT, 129 for SIGHUP (see
:mod:`distnn.errors`). Rank 0 says so on a Ctrl-C: a step, an evaluation or a
checkpoint may take a while. A Ctrl-C while a stop is pending (a second
Ctrl-C) ends the process at once instead (:func:`end_at_once`).

SIGINT and SIGHUP stay ignored in a process started with them ignored: ``nohup``
ignores SIGHUP, and a shell script's ``command &`` SIGINT, on purpose.

The process-wide :data:`REQUEST` is installed as the very first thing
``python -m distnn.train`` does, before its slow imports (numpy, h5py,
``MPI_Init``), and again after ``MPI_Init`` (MPICH's UCX puts handlers of its
own for SIGUSR1 and SIGHUP there, over an ignored SIGHUP too). Once the outcome
of a run is decided, :meth:`StopRequest.ignore` makes the signals harmless for
the rest of the process's life: Python would otherwise restore their default
action, which kills (or raises KeyboardInterrupt), while the interpreter and
MPI shut down.
"""

import os
import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
KEPT_IGNORED = (signal.SIGINT, signal.SIGHUP)  # ignored on purpose by nohup, a script's `&`
PROG = "distnn.train"  # errors.TRAIN: this module loads before it (argparse is slow)


class StopRequest:
    """The stop signal this process received (``signum``, 0 if none)."""

    def __init__(self):
        self.signum = 0
        self.caught = None  # the stop signals this process catches (None: not installed)
        self.waiting_for = None  # what an interruptible wait opens (None: not waiting)
        self.announce = False  # say what the first Ctrl-C does (rank 0, once it knows)

    def install(self):
        """Catch the stop signals (again); a signal caught earlier is kept. The first call
        decides which: all but a SIGINT or SIGHUP that the process started with ignored."""
        if self.caught is None:
            self.caught = [s for s in SIGNALS
                           if s not in KEPT_IGNORED or signal.getsignal(s) != signal.SIG_IGN]
        for sig in SIGNALS:
            signal.signal(sig, self._handle if sig in self.caught else signal.SIG_IGN)
        self._interrupt_calls(False)  # restart system calls (file writes, MPI waits)
        return self

    @contextmanager
    def interruptible(self, what):
        """While inside, a stop signal ends the wait at once (a Stopped exception naming
        ``what``) instead of waiting for the step boundary: for opening an input, which
        blocks for ever when the input turns out to be a FIFO. Nothing else happens in
        such a section, so nothing is left half-done. A signal that came before is left
        for the step boundary, as anywhere else in start-up: the process was not blocked."""
        if self.caught is None:
            yield
            return
        try:
            self.waiting_for = what
            self._interrupt_calls(True)  # the blocked open() returns EINTR to Python
            yield
        finally:
            self.waiting_for = None
            self._interrupt_calls(False)

    def ignore(self):
        """Ignore the stop signals from now on: the run's outcome is already decided."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _interrupt_calls(self, interrupt):
        for sig in self.caught:
            signal.siginterrupt(sig, interrupt)

    def _handle(self, signum, frame):
        pending, self.signum = self.signum, self.signum or signum
        if self.waiting_for is not None:
            self._stop_waiting(signum)
        if signum == signal.SIGINT and pending:
            end_at_once()
        if signum == signal.SIGINT and self.announce:
            os.write(2, f"{PROG}: Ctrl-C (SIGINT): stopping after this step, with a checkpoint; "
                        f"Ctrl-C again ends at once\n".encode())

    def _stop_waiting(self, signum):
        # imported here, not before the first install (argparse is slow); loaded by now
        from distnn.errors import stopped
        what, self.waiting_for = self.waiting_for, None  # a next signal: as anywhere else
        raise stopped(signum, f"{signal.Signals(signum).name} received while opening {what}; "
                              f"stopped before training, nothing was written")


def end_at_once():
    """A Ctrl-C while a stop is pending: the user will not wait for the step to end.
    One line and exit 130 now, whatever the process is doing (no cleanup that could
    block; a temporary file left behind is removed by the next run in the folder);
    under ``mpirun`` the launcher then ends the other ranks."""
    os.write(2, f"{PROG}: interrupted: Ctrl-C (SIGINT) again while stopping: ended at once, "
                f"without a checkpoint of this step; --resume continues from the last one "
                f"written\n".encode())
    os._exit(128 + signal.SIGINT)


REQUEST = StopRequest()
