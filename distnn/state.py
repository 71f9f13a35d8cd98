"""Where a run stands at a step boundary, and handing rank 0's state to every rank.

The state is all a run needs to continue exactly (:mod:`distnn.rundir.checkpoint`
stores it): the validation split and every epoch's shuffle are pure functions
of (seed, epoch), the learning rate one of the step (:mod:`distnn.schedule`),
and the exact reduction makes it independent of the rank count.
"""

import dataclasses
import json

import numpy as np

from distnn.parallel import broadcast_params
from distnn.step import N_STATS


@dataclasses.dataclass
class TrainState:
    """Where a run stands at a step boundary."""
    params: list
    velocity: list = dataclasses.field(default_factory=list)  # (vW, vb) per layer; [] if no momentum
    step: int = 0          # steps taken in the whole run
    epoch: int = 1         # the epoch in progress (1-based)
    position: int = 0      # steps of that epoch already taken
    totals: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(N_STATS))  # loss, correct
    seen: int = 0          # samples of that epoch already trained on
    history: list = dataclasses.field(default_factory=list)  # metrics records so far
    elapsed_s: float = 0.0  # seconds of training before this state, over all sessions

    def advance(self, rows, stat_sums):
        """Count one step of ``rows`` samples whose statistics summed to ``stat_sums``."""
        self.step += 1
        self.position += 1
        self.seen += rows
        self.totals = self.totals + stat_sums

    def next_epoch(self, record):
        """Close the epoch with its metrics ``record`` and begin the next."""
        self.history.append(record)
        self.epoch += 1
        self.position, self.seen, self.totals = 0, 0, np.zeros(N_STATS)


def share_state(comm, state, params, velocity):
    """Make every rank hold rank 0's ``state`` (None on the others, or on rank 0 for a
    fresh run); ``params`` and ``velocity`` (its zeros, [] without momentum) are this
    rank's arrays to fill, and a fresh run's starting values on rank 0."""
    meta = None
    if comm.rank == 0:
        if state is None:
            state = TrainState(params=params, velocity=velocity)
        meta = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
                if f.name not in ("params", "velocity")}
        meta = json.dumps({**meta, "totals": [float(t) for t in meta["totals"]]})
    # as JSON, not pickled numpy objects: ranks may run different numpy versions
    meta = json.loads(comm.bcast(meta, root=0))
    held = broadcast_params(comm, state.params if comm.rank == 0 else params)
    moving = broadcast_params(comm, state.velocity if comm.rank == 0 else velocity)
    meta["totals"] = np.asarray(meta["totals"], np.float64)
    return TrainState(params=held, velocity=moving, **meta)
