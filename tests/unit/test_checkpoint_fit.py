"""What a checkpoint must hold for a run to continue it (distnn.state.misfit), and how
resuming treats one that does not fit: skipped with a warning, or refused with one line."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from distnn import model, optim, rundir
from distnn.config import Config
from distnn.errors import UserError
from distnn.rundir import checkpoint
from distnn.state import RunShape, TrainState, misfit

# 95 training rows in batches of 10: 10 steps an epoch, the last of 5 rows
RUN = RunShape(layers=(6, 5, 3), dtype=np.dtype(np.float32), momentum=True, batch_size=10,
               train_size=95, epochs=3, max_steps=0)


def walked(steps, run=RUN, close=True):
    """The state after ``steps`` steps, kept as the trainer keeps it (advance, next_epoch);
    ``close=False`` leaves an epoch's last step unclosed (a stop signal at that step)."""
    params = model.init_params(list(run.layers), seed=1)
    state = TrainState(params=params, velocity=optim.zero_velocity(params, run.momentum),
                       history=[{"epoch": 0, "step": 0, "val_acc": 0.1, "test_acc": 0.1}])
    while state.step < steps:
        rows = min(run.batch_size, run.train_size - state.position * run.batch_size)
        state.advance(rows, np.array([0.5 * rows, 1.0]))
        if state.position == run.steps_per_epoch and (close or state.step < steps):
            state.next_epoch({"epoch": state.epoch, "step": state.step, "train_loss": 0.5,
                              "train_acc": 0.1, "val_acc": 0.2, "test_acc": 0.2})
    state.elapsed_s = 1.5
    return state


@pytest.mark.parametrize("steps, close", [(0, True), (3, True), (10, True), (10, False),
                                          (27, True), (30, False), (30, True)])
def test_every_state_the_run_goes_through_fits(steps, close):
    """Mid-epoch, an epoch's end (and its last step under a stop signal), the end of the
    last epoch."""
    assert misfit(walked(steps, close=close), RUN) is None


def test_without_momentum_there_is_no_velocity_to_fit():
    plain = dataclasses.replace(RUN, momentum=False)
    assert misfit(walked(13, plain), plain) is None
    with_velocity = walked(13, plain)
    with_velocity.velocity = walked(13).velocity
    assert "velocity for 2 layers, where this run has 0" in misfit(with_velocity, plain)


def change(**values):
    """A change to a state of 13 steps (epoch 2, position 3): attributes set to ``values``,
    callables applied to the state's own."""
    def apply(state):
        for name, value in values.items():
            setattr(state, name, value(getattr(state, name)) if callable(value) else value)
    return apply


def nan_in_first(pairs):
    W = pairs[0][0].copy()
    W[0, 0] = np.nan
    return [(W, pairs[0][1]), *pairs[1:]]


@pytest.mark.parametrize("changed, why", [
    (change(velocity=[]), "it holds velocity for 0 layers, where this run has 2"),
    (change(params=lambda p: [(W.astype(np.float64), b.astype(np.float64)) for W, b in p]),
     "its parameters W of layer 0 is float64 (6, 5), this run's float32 (6, 5)"),
    (change(params=lambda p: [(p[0][0][:, :4], p[0][1][:4]), (p[1][0][:4], p[1][1])]),
     "its parameters W of layer 0 is float32 (6, 4), this run's float32 (6, 5)"),
    (change(params=lambda p: p[:1]), "it holds parameters for 1 layers, where this run has 2"),
    (change(velocity=lambda v: [(v[0][0], v[0][1][:4]), v[1]]), "its velocity b of layer 0"),
    (change(params=nan_in_first), "its parameters W of layer 0 holds NaN or infinite values"),
    (change(position=15, step=25, seen=95), "its position 15 in epoch 2 is outside epochs of 10"),
    (change(epoch=0, step=3), "its position 3 in epoch 0 is outside"),
    (change(step=14), "its step 14 does not follow from its position 3 in epoch 2"),
    (change(seen=31), "it has seen 31 samples in 3 steps of 10 (of 95)"),
    (change(epoch=5, step=43), "its history is not a list of the 5 records of epochs 0 to 4"),
    (change(totals=np.zeros(3)), "its stat totals (shape (3,)) are not 2 finite numbers"),
    (change(totals=np.array([np.inf, 1.0])), "its stat totals (shape (2,)) are not 2 finite"),
    (change(totals=np.array([1.0, 31.0])), "its stat totals [1.0, 31.0] are not the sums of 30"),
    (change(history=lambda h: dict(enumerate(h))), "its history is not a list of the 2"),
    (change(history=lambda h: [h[0], [h[1]]]), "its history record 1 is a list, not a record"),
    (change(history=lambda h: [h[0], {**h[1], "step": 9}]),
     "its history record 1 is of epoch 1 at step 9, not of epoch 1 at step 10"),
    (change(history=lambda h: [h[0], {**h[1], "epoch": 1.0}]), "its history record 1 is of epoch 1.0"),
    (change(history=lambda h: [h[0], {k: v for k, v in h[1].items() if k != "train_loss"}]),
     "its history record 1 has no finite train_loss"),
    (change(history=lambda h: [{**h[0], "val_acc": "high"}, h[1]]),
     "its history record 0 has no finite val_acc"),
    (change(position="3"), "its position '3' is not a whole number of at least 0"),
    (change(seen=30.0), "its seen 30.0 is not a whole number"),
    (change(epoch=True), "its epoch True is not a whole number"),
    (change(step=np.array([13])), "its step array([13]) is not a whole number"),
    (change(step=-1), "its step -1 is not a whole number of at least 0"),
    (change(elapsed_s=float("nan")), "its elapsed_s nan is not a number of seconds"),
    (change(elapsed_s="1.5"), "its elapsed_s '1.5' is not a number of seconds"),
])
def test_a_state_the_run_never_goes_through_is_named(changed, why):
    state = walked(13)
    changed(state)
    assert why in misfit(state, RUN)


def test_loading_keeps_the_stored_types(tmp_path):
    """Counters stored as anything but whole numbers reach the check as they were stored
    (reading them as int() would hide a string or a float)."""
    state = walked(13)
    assert misfit(checkpoint.load(checkpoint.save(tmp_path, state, "{}", "d", keep=3))[0],
                  RUN) is None
    state.position, state.elapsed_s = "3", True
    loaded = checkpoint.load(checkpoint.save(tmp_path, state, "{}", "d", keep=3))[0]
    assert (loaded.position, loaded.elapsed_s) == ("3", True)
    assert "its position '3' is not a whole number" in misfit(loaded, RUN)


# -- resuming: which checkpoint is continued, which skipped, which refused --------------

def settings(tmp_path, **changes):
    return Config(**{"layers": RUN.layers, "batch_size": RUN.batch_size, "epochs": RUN.epochs,
                     "schedule": "constant", "out": str(tmp_path), "resume": True, "quiet": True,
                     **changes})


DATA = SimpleNamespace(fingerprint="data", size=lambda split: RUN.train_size)


def save(tmp_path, state, cfg=None, config_json=None):
    return checkpoint.save(tmp_path / rundir.CHECKPOINTS, state,
                           config_json or (cfg or settings(tmp_path)).to_json(), "data", keep=5)


def test_resume_skips_one_that_does_not_fit_for_the_previous_one(tmp_path, capsys):
    save(tmp_path, walked(8))
    save(tmp_path, walked(12))
    broken = walked(13)
    broken.totals = np.zeros(3)
    newest = save(tmp_path, broken)
    state = rundir.resume_state(settings(tmp_path), DATA)
    assert state.step == 12
    warning = capsys.readouterr().err
    assert f"warning: skipping {newest}: does not fit this run: its stat totals" in warning


def test_resume_skips_settings_that_are_no_json_object(tmp_path, capsys):
    save(tmp_path, walked(8))
    newest = save(tmp_path, walked(9), config_json='["a list"]')
    assert rundir.resume_state(settings(tmp_path), DATA).step == 8
    assert f"skipping {newest}: its settings are not a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("flags, end", [({"epochs": 2}, "step 20 (--epochs 2 of 10 steps)"),
                                        ({"max_steps": 12}, "step 12 (--max-steps 12)")])
def test_resume_refuses_a_checkpoint_past_the_runs_end(tmp_path, flags, end):
    """The run's flags, not the checkpoint, are wrong: no older checkpoint is taken instead
    (its continuation would prune the newer ones)."""
    save(tmp_path, walked(10))
    newest = save(tmp_path, walked(25))
    with pytest.raises(UserError) as refused:
        rundir.resume_state(settings(tmp_path, **flags), DATA)
    assert str(refused.value) == f"cannot resume from {newest}: it is at step 25, past this run's end at {end}"


@pytest.mark.parametrize("steps, flags", [(30, {}), (25, {"max_steps": 25}), (30, {"epochs": 4}),
                                          (25, {"epochs": 3, "max_steps": 40})])
def test_resume_takes_a_checkpoint_up_to_the_runs_end(tmp_path, steps, flags):
    """The end of the last epoch, a --max-steps stop, and runs made longer."""
    save(tmp_path, walked(steps))
    assert rundir.resume_state(settings(tmp_path, **flags), DATA).step == steps
