"""Checkpoint files: round trip, atomic replacement, pruning, and corruption detection."""

import h5py
import numpy as np
import pytest

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
