"""Checkpoint files: round trip, atomic replacement, pruning, corruption detection, entries
that are no regular files; and resuming skips checkpoints that do not fit the run."""

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager

import h5py
import numpy as np
import pytest
from conftest import launch_train, run_result, trained

from distnn import model
from distnn.rundir import checkpoint
from distnn.state import TrainState


def make_state(step=7):
    params = model.init_params([6, 5, 3], seed=1)
    velocity = [(W * 0.5, b - 1) for W, b in params]
    return TrainState(params=params, velocity=velocity, step=step, epoch=2, position=3,
                                 totals=np.array([1.5, 2.0]), seen=96,
                                 history=[{"epoch": 1, "test_acc": 0.5, "train_loss": 1.25}])


def test_round_trip_keeps_every_value(tmp_path):
    state = make_state()
    path = checkpoint.save(tmp_path, state, '{"lr": 0.5}', "abc", keep=3)
    assert path.name == "ckpt-000000007.h5"
    loaded, config_json, data = checkpoint.load(path)
    assert (config_json, data) == ('{"lr": 0.5}', "abc")
    for (W, b), (W2, b2) in zip(state.params + state.velocity, loaded.params + loaded.velocity):
        assert np.array_equal(W, W2) and W2.dtype == W.dtype and np.array_equal(b, b2)
    assert len(loaded.velocity) == 2
    assert (loaded.step, loaded.epoch, loaded.position, loaded.seen) == (7, 2, 3, 96)
    assert np.array_equal(loaded.totals, state.totals)
    assert loaded.history == state.history
    assert not list(tmp_path.glob(".*tmp"))


def test_keeps_only_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        checkpoint.save(tmp_path, make_state(step), "{}", "d", keep=2)
    assert [s for s, _ in checkpoint.listing(tmp_path)] == [15, 20]


def test_truncated_checkpoint_is_detected(tmp_path):
    path = checkpoint.save(tmp_path, make_state(), "{}", "d", keep=3)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(checkpoint.CheckpointError, match="ckpt-000000007.h5: unreadable"):
        checkpoint.load(path)


def test_flipped_byte_is_detected(tmp_path):
    path = checkpoint.save(tmp_path, make_state(), "{}", "d", keep=3)
    with h5py.File(path, "r") as f:
        offset = f["params/0/W"].id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset + 10] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        checkpoint.load(path)


def test_latest_skips_corrupt_newest_with_a_warning(tmp_path):
    checkpoint.save(tmp_path, make_state(5), "{}", "d", keep=3)
    newest = checkpoint.save(tmp_path, make_state(9), "{}", "d", keep=3)
    newest.write_bytes(b"\0" * 100)
    warnings = []
    path, state, _, _ = checkpoint.load_latest(tmp_path, warnings.append)
    assert state.step == 5 and path.name == "ckpt-000000005.h5"
    assert len(warnings) == 1 and "ckpt-000000009.h5" in warnings[0]


def test_latest_without_checkpoints_and_with_only_corrupt_ones(tmp_path):
    assert checkpoint.load_latest(tmp_path / "none", print) is None
    bad = checkpoint.save(tmp_path, make_state(3), "{}", "d", keep=3)
    bad.write_bytes(b"junk")
    with pytest.raises(checkpoint.CheckpointError, match="no valid checkpoint"):
        checkpoint.load_latest(tmp_path, lambda m: None)


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path):
    good = checkpoint.save(tmp_path, make_state(4), "{}", "d", keep=3)
    broken = make_state(8)
    broken.params = [(object(), None)]  # h5py cannot store this: the write fails midway
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path, broken, "{}", "d", keep=3)
    assert [p.name for _, p in checkpoint.listing(tmp_path)] == [good.name]
    assert not list(tmp_path.glob(".*tmp"))
    assert checkpoint.load(good)[0].step == 4


def test_without_momentum_there_is_no_velocity(tmp_path):
    state = make_state()
    state.velocity = []
    loaded, _, _ = checkpoint.load(checkpoint.save(tmp_path, state, "{}", "abc", keep=1))
    assert loaded.velocity == []


@pytest.mark.parametrize("version, why", [
    (2, "version 2 cannot be continued: it has no optimizer state"),
    (1, "version 1 cannot be continued: its arithmetic gives other bits")])
def test_older_versions_are_refused_with_the_reason(tmp_path, version, why):
    path = checkpoint.save(tmp_path, make_state(), "{}", "abc", keep=1)
    with h5py.File(path, "r+") as f:
        f.attrs["version"] = version
    with pytest.raises(checkpoint.CheckpointError, match=why):
        checkpoint.load(path)


# -- entries that are no regular files ---------------------------------------------------

# opens the FIFO argv[1] for writing and closes it again whenever a reader waits for a writer
LET_GO = """import os, sys, time
while True:
    try:
        os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))  # ENXIO until a reader waits
    except OSError:
        pass
    time.sleep(0.01)
"""


@contextmanager
def unblocking(fifo):
    """While inside, a reader blocked opening ``fifo`` is let go at once (by another process:
    this one may be held inside h5py, the GIL with it), so a test of code that would block
    there fails instead of hanging."""
    writer = subprocess.Popen([sys.executable, "-c", LET_GO, str(fifo)])
    try:
        yield
    finally:
        writer.kill()
        writer.wait()


def test_latest_skips_links_fifos_and_folders_without_opening_them(tmp_path):
    folder = tmp_path / "checkpoints"
    oldest = checkpoint.save(folder, make_state(5), "{}", "d", keep=5)
    elsewhere = checkpoint.save(tmp_path / "elsewhere", make_state(9), "{}", "d", keep=5)
    (folder / "ckpt-000000006.h5").symlink_to(elsewhere)
    (folder / "ckpt-000000007.h5").mkdir()
    os.mkfifo(folder / "ckpt-000000008.h5")
    warnings = []
    with unblocking(folder / "ckpt-000000008.h5"):
        path, state, _, _ = checkpoint.load_latest(folder, warnings.append)
    assert (path, state.step) == (oldest, 5)
    assert warnings == [f"skipping checkpoint {folder}/ckpt-00000000{step}.h5: is {kind}, not a "
                        f"regular file" for step, kind in ((8, "a FIFO"), (7, "a folder"),
                                                           (6, "a symbolic link"))]


# -- resuming from checkpoints that do not fit the run -----------------------------------

# 950 training rows in batches of 100: 10 steps an epoch, the last of 50 rows
FIT_ARGS = ["--train-limit", "1150", "--val-size", "200", "--batch-size", "100", "--epochs", "3",
            "--layers", "784,8,10", "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def uninterrupted(mnist_h5, tmp_path_factory):
    return trained(["--data", mnist_h5, *FIT_ARGS], tmp_path_factory.mktemp("uninterrupted"))


@pytest.fixture(scope="module")
def stopped(mnist_h5, tmp_path_factory):
    """A run stopped by --max-steps in its last epoch, with checkpoints at steps 20, 24, 25."""
    out = tmp_path_factory.mktemp("stopped")
    result = launch_train(["--data", mnist_h5, "--out", out, *FIT_ARGS, "--max-steps", "25"])
    assert result.returncode == 0, result.stderr
    assert [s for s, _ in checkpoint.listing(out / "checkpoints")] == [20, 24, 25]
    return out


def narrower(pairs):
    """The layers 784,8,10 cut to 784,4,10."""
    (W0, b0), (W1, b1) = pairs
    return [(np.ascontiguousarray(W0[:, :4]), b0[:4]), (np.ascontiguousarray(W1[:4]), b1)]


def first_nan(pairs):
    W = pairs[0][0].copy()
    W[0, 0] = np.nan
    return [(W, pairs[0][1]), *pairs[1:]]


# the newest state (step 25: epoch 3, position 5, 500 rows seen) as each change leaves it, and
# the start of what a resume says of it; the cases first
MISFITS = {
    "no velocity": ({"velocity": []}, "it holds velocity for 0 layers"),
    "float64 parameters": ({"params": lambda p: [(W.astype(np.float64), b.astype(np.float64))
                                                 for W, b in p]},
                           "its parameters W of layer 0 is float64 (784, 8)"),
    "position beyond the epoch": ({"position": 15, "step": 35, "seen": 950},
                                  "its position 15 in epoch 3 is outside epochs of 10 steps"),
    "narrower network": ({"params": narrower, "velocity": narrower},
                         "its parameters W of layer 0 is float32 (784, 4)"),
    "broken chain of steps": ({"step": 26}, "its step 26 does not follow"),
    "totals of another shape": ({"totals": np.zeros(3)}, "its stat totals (shape (3,))"),
    "history a dict": ({"history": lambda h: {str(k): r for k, r in enumerate(h)}},
                       "its history is not a list"),
    "position past the last epoch": ({"epoch": 5, "step": 45},
                                     "its history is not a list of the 5 records"),
    "NaN parameters": ({"params": first_nan}, "its parameters W of layer 0 holds NaN"),
    "record without train_loss": ({"history": lambda h: [h[0], {"epoch": 1, "step": 10}, h[2]]},
                                  "its history record 1 has no finite train_loss"),
    "seen off by one": ({"seen": 501}, "it has seen 501 samples in 5 steps of 100 (of 950)"),
}


def replace_newest(folder, changes):
    """Put in place of the newest checkpoint in ``folder`` one that the project's own save
    writes (its SHA-256 valid) of the same state with ``changes`` (values, or functions of
    the old ones); returns its path."""
    _, newest = checkpoint.listing(folder)[-1]
    state, config_json, data = checkpoint.load(newest)
    newest.unlink()
    for name, value in changes.items():
        setattr(state, name, value(getattr(state, name)) if callable(value) else value)
    return checkpoint.save(folder, state, config_json, data, keep=10)


def resumed_past(out, mnist_h5, ranks, skipped):
    """Resume the run in ``out``: it must warn once for each of ``skipped`` (lines), and
    nothing else, continue from step 24 and end as the uninterrupted run; returns its result."""
    result = launch_train(["--data", mnist_h5, "--out", out, *FIT_ARGS, "--resume"], ranks=ranks,
                          timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == len(skipped) and all(s in l for s, l in zip(skipped, lines)), result.stderr
    assert f"resuming from {out / 'checkpoints' / 'ckpt-000000024.h5'}" in result.stdout
    return run_result(out)


@pytest.mark.parametrize("ranks", [None, 2])
@pytest.mark.parametrize("case", list(MISFITS))
def test_resume_skips_a_checkpoint_that_does_not_fit_the_run(uninterrupted, stopped, mnist_h5,
                                                             tmp_path, case, ranks):
    """Never a hang, a traceback or another result: the previous checkpoint is continued."""
    out = shutil.copytree(stopped, tmp_path / "run")
    changes, why = MISFITS[case]
    bad = replace_newest(out / "checkpoints", changes)
    warning = f"warning: skipping {bad}: does not fit this run: {why}"
    assert resumed_past(out, mnist_h5, ranks, [warning]) == uninterrupted


@pytest.mark.parametrize("ranks", [None, 2])
def test_resume_never_opens_a_checkpoint_entry_that_is_a_fifo_or_a_link(
        uninterrupted, stopped, mnist_h5, tmp_path, ranks):
    """A FIFO would block open() for ever; a link leads out of the run folder."""
    out = shutil.copytree(stopped, tmp_path / "run")
    folder = out / "checkpoints"
    _, newest = checkpoint.listing(folder)[-1]
    elsewhere = shutil.copy(newest, tmp_path / "elsewhere.h5")
    newest.unlink()
    (folder / "ckpt-000000026.h5").symlink_to(elsewhere)
    os.mkfifo(folder / "ckpt-000000027.h5")
    skipped = [f"warning: skipping checkpoint {folder}/ckpt-00000002{step}.h5: is {kind}, not a "
               f"regular file" for step, kind in ((7, "a FIFO"), (6, "a symbolic link"))]
    assert resumed_past(out, mnist_h5, ranks, skipped) == uninterrupted
