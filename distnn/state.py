"""Where a run stands at a step boundary.

The state is all a run needs to continue exactly (:mod:`distnn.rundir.checkpoint`
stores it): the validation split and every epoch's shuffle are pure functions
of (seed, epoch), the learning rate one of the step (:mod:`distnn.schedule`),
and the exact reduction makes it independent of the rank count.
"""

import dataclasses

import numpy as np

N_STATS = 2  # per training row, summed over the epoch: loss, correct


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
