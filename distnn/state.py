"""Where a run stands at a step boundary.

The state is all a run needs to continue exactly (:mod:`distnn.rundir.checkpoint`
stores it): the validation split and every epoch's shuffle are pure functions
of (seed, epoch), the learning rate one of the step (:mod:`distnn.schedule`),
and the exact reduction makes it independent of the rank count.

A state read back from a checkpoint is continued only if it is one the run
goes through (:func:`misfit`, against the run's :class:`RunShape`): every rank
sizes its messages and arrays from the run's settings, not from the file.
"""

import dataclasses
import math

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


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What every state of a run looks like, from its settings and its data: what a
    checkpoint must hold for the run to continue it (:func:`misfit`)."""
    layers: tuple       # the widths, input first
    dtype: np.dtype     # of every parameter and velocity array
    momentum: bool      # whether there is a velocity
    batch_size: int
    train_size: int     # training rows in an epoch
    epochs: int
    max_steps: int      # 0: none

    @classmethod
    def of(cls, cfg, train_size):
        """The shape of the run of ``cfg`` on ``train_size`` training rows."""
        return cls(tuple(cfg.layers), np.dtype(cfg.dtype), bool(cfg.momentum), cfg.batch_size,
                   train_size, cfg.epochs, cfg.max_steps)

    @property
    def steps_per_epoch(self):
        return -(-self.train_size // self.batch_size)

    @property
    def last_step(self):
        """The step the run ends at: its epochs', or --max-steps when sooner."""
        end = self.epochs * self.steps_per_epoch
        return min(end, self.max_steps) if self.max_steps else end


# what the trainer reads back from a history record besides its epoch and step: finite
# numbers, the training sums of every epoch after the baseline (epoch 0), and the
# evaluation's scores where the run has that split
RECORD_SUMS = ("train_loss", "train_acc")
RECORD_SCORES = ("val_acc", "test_acc")


def misfit(state, run):
    """Why ``state`` (read from a checkpoint) is not a state that ``run`` (a RunShape) goes
    through, in a few words; None when it is one. Checked: the types, the arrays (count,
    shapes, dtype, finite values), the counters against each other as :meth:`TrainState.advance`
    and :meth:`TrainState.next_epoch` keep them, the epoch's sums and the history. Whether the
    state is past the run's end is another question (:attr:`RunShape.last_step`)."""
    for name in ("step", "epoch", "position", "seen"):
        value = getattr(state, name)
        if not whole(value) or value < 0:
            return f"its {name} {value!r} is not a whole number of at least 0"
    if not number(state.elapsed_s) or state.elapsed_s < 0:
        return f"its elapsed_s {state.elapsed_s!r} is not a number of seconds"
    shapes = [((n_in, n_out), (n_out,)) for n_in, n_out in zip(run.layers, run.layers[1:])]
    problem = (arrays_misfit("parameters", state.params, shapes, run.dtype)
               or arrays_misfit("velocity", state.velocity, shapes if run.momentum else [],
                                run.dtype))
    if problem:
        return problem
    per_epoch = run.steps_per_epoch
    if state.epoch < 1 or state.position > per_epoch:
        return (f"its position {state.position} in epoch {state.epoch} is outside epochs of "
                f"{per_epoch} steps")
    follows = (state.epoch - 1) * per_epoch + state.position
    if state.step != follows:
        return (f"its step {state.step} does not follow from its position {state.position} in "
                f"epoch {state.epoch} (epochs of {per_epoch} steps: step {follows})")
    if state.seen != min(state.position * run.batch_size, run.train_size):
        return (f"it has seen {state.seen} samples in {state.position} steps of "
                f"{run.batch_size} (of {run.train_size})")
    return totals_misfit(state.totals, state.seen) or history_misfit(state.history, state.epoch,
                                                                     per_epoch)


def arrays_misfit(name, arrays, shapes, dtype):
    """Why ``arrays`` ([(W, b)] per layer) are not arrays of ``shapes`` and ``dtype`` with
    finite values; None when they are."""
    if len(arrays) != len(shapes):
        return f"it holds {name} for {len(arrays)} layers, where this run has {len(shapes)}"
    for layer, (pair, pair_shapes) in enumerate(zip(arrays, shapes)):
        for key, array, shape in zip("Wb", pair, pair_shapes):
            if array.shape != shape or array.dtype != dtype:
                return (f"its {name} {key} of layer {layer} is {array.dtype} {array.shape}, "
                        f"this run's {dtype} {shape}")
            if not np.isfinite(array).all():
                return f"its {name} {key} of layer {layer} holds NaN or infinite values"
    return None


def totals_misfit(totals, seen):
    """Why ``totals`` are not the sums (loss, correct) of ``seen`` samples; None if they are."""
    if not (isinstance(totals, np.ndarray) and totals.shape == (N_STATS,)
            and totals.dtype == np.float64 and np.isfinite(totals).all()):
        return f"its stat totals (shape {np.shape(totals)}) are not {N_STATS} finite numbers"
    if not 0 <= totals[1] <= seen or (seen == 0 and totals.any()):
        return f"its stat totals {totals.tolist()} are not the sums of {seen} samples"
    return None


def history_misfit(history, epoch, steps_per_epoch):
    """Why ``history`` is not the metrics records of epochs 0 to ``epoch`` - 1; None if it is."""
    if not isinstance(history, list) or len(history) != epoch:
        return f"its history is not a list of the {epoch} records of epochs 0 to {epoch - 1}"
    for k, record in enumerate(history):
        if not isinstance(record, dict):
            return f"its history record {k} is a {type(record).__name__}, not a record"
        place = record.get("epoch"), record.get("step")
        if not all(map(whole, place)) or place != (k, k * steps_per_epoch):
            return (f"its history record {k} is of epoch {place[0]!r} at step {place[1]!r}, "
                    f"not of epoch {k} at step {k * steps_per_epoch}")
        keys = (RECORD_SUMS if k else ()) + tuple(key for key in RECORD_SCORES if key in record)
        missing = [key for key in keys if not number(record.get(key))]
        if missing:
            return f"its history record {k} has no finite {', '.join(missing)}"
    return None


def whole(value):
    """Whether ``value`` is a Python int (not a bool, an array or a string of digits)."""
    return isinstance(value, int) and not isinstance(value, bool)


def number(value):
    """Whether ``value`` is a finite Python int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
