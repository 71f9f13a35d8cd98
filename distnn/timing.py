"""Where a training step's seconds go, measured the same way by the trainer and the bench.

A step has three phases: ``data`` (reading this rank's share of the batch and
finding its pixel columns), ``comm`` (the step's MPI Allreduce calls, timed
around each call by :class:`TimedComm`) and ``compute`` (everything else:
forward, backward, rounding to the exact grids, the products, the update).
"""

import time

from mpi4py import MPI

PHASES = ("data", "compute", "comm")


class TimedComm:
    """A communicator whose Allreduce calls are timed and counted (``seconds``, and
    ``bytes``: the buffers' sizes); anything else goes to ``comm``."""

    def __init__(self, comm):
        self.comm = comm
        self.seconds, self.bytes = 0.0, 0

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        start = time.perf_counter()
        self.comm.Allreduce(sendbuf, recvbuf, op=op)
        self.seconds += time.perf_counter() - start
        self.bytes += recvbuf.nbytes


class StepTimer:
    """Seconds per phase (:data:`PHASES`) and Allreduce bytes since the last :meth:`reset`.

    Per step: :meth:`start`, then :meth:`loaded` once the batch is read, then
    :meth:`stepped` once the parameters are updated; the time ``comm`` (a
    :class:`TimedComm`) spent in Allreduce meanwhile counts as ``comm``, the rest
    of the step as ``compute``.
    """

    def __init__(self, comm):
        self.comm = comm
        self.reset()

    def reset(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.bytes = 0

    def start(self):
        self._start, self._comm, self._bytes = time.perf_counter(), self.comm.seconds, self.comm.bytes

    def loaded(self):
        self._loaded = time.perf_counter()
        self._comm_loaded = self.comm.seconds

    def stepped(self):
        end = time.perf_counter()
        comm = self.comm.seconds - self._comm
        step_comm = self.comm.seconds - self._comm_loaded
        self.seconds["data"] += self._loaded - self._start - (comm - step_comm)
        self.seconds["comm"] += comm
        self.seconds["compute"] += end - self._loaded - step_comm
        self.bytes += self.comm.bytes - self._bytes
