"""A rank lost just as a run ends: rank 1 is killed after the last collective, and rank 0,
ending with ``distnn.parallel.finish``, must leave within its bound instead of waiting for it
in MPI finalisation. Run under a launcher that does not end the job when a rank dies
(srun without --wait)."""

import os
import signal

from distnn.stop import REQUEST

REQUEST.install()

from mpi4py import MPI  # noqa: E402  (after the handlers, as distnn.train does)

from distnn import parallel  # noqa: E402

world = MPI.COMM_WORLD
world.Barrier()
if world.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
parallel.finish(world, "lost-peer", 0, REQUEST)
