"""A run folder someone else can write to: no symlink or FIFO placed there makes a run
write, lock, block or delete anywhere else, and a refused ``--out`` leaves nothing."""

import errno
import os

import numpy as np
import pytest

from distnn.errors import OutputError, UserError
from distnn.files import atomic_write
from distnn.rundir import (
    CHECKPOINTS,
    CONFIG,
    LOCK,
    METRICS,
    MODEL,
    SUMMARY,
    checkpoint,
    claim,
)
from distnn.rundir.metrics import MetricsLog
from distnn.state import TrainState

FIXED = [LOCK, CONFIG, METRICS, MODEL, SUMMARY]


@pytest.fixture
def victim(tmp_path):
    """A file outside the run folder that a run must never touch."""
    path = tmp_path / "victim.txt"
    path.write_text("IMPORTANT\n")
    return path


def untouched(victim):
    return victim.read_text() == "IMPORTANT\n"


@pytest.mark.parametrize("name", FIXED)
@pytest.mark.parametrize("resume", [False, True])
def test_a_fixed_entry_that_is_a_symlink_is_refused_and_its_target_untouched(
        name, resume, victim, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(victim)
    with pytest.raises(UserError, match=f"{name} is in the way: it is a symbolic link"):
        claim.claim(out, resume)
    assert untouched(victim) and (out / name).is_symlink()


@pytest.mark.parametrize("name", FIXED)
def test_a_symlink_to_a_missing_file_creates_nothing(name, tmp_path):
    out, missing = tmp_path / "run", tmp_path / "elsewhere" / "created.txt"
    out.mkdir()
    missing.parent.mkdir()
    (out / name).symlink_to(missing)
    with pytest.raises(UserError, match="symbolic link"):
        claim.claim(out, resume=True)
    assert not missing.exists()


@pytest.mark.parametrize("name", FIXED)
def test_a_fifo_in_the_run_folder_is_refused_without_blocking(name, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / name)
    with pytest.raises(UserError, match=f"{name} is in the way: it is a FIFO"):
        claim.claim(out, resume=True)


def test_a_checkpoints_symlink_is_refused_and_nothing_there_deleted(tmp_path):
    """The stale-temporary cleanup once deleted matching files in the link's target."""
    other = tmp_path / "other"
    other.mkdir()
    kept = [other / ".ckpt-000000005.h5.abcd1234.tmp", other / "ckpt-000000005.h5"]
    for path in kept:
        path.write_text("someone else's")
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINTS).symlink_to(other)
    with pytest.raises(UserError, match=f"{CHECKPOINTS} is in the way: it is a symbolic link, "
                                        "not a folder"):
        claim.claim(out, resume=True)
    assert all(path.read_text() == "someone else's" for path in kept)


def test_a_leftover_temporary_that_is_a_symlink_is_removed_not_its_target(victim, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".{MODEL}.abcd1234.tmp"
    stale.symlink_to(victim)
    claim.claim(out, resume=True).release()
    assert not stale.is_symlink() and untouched(victim)


def test_a_refused_out_leaves_none_of_the_folders_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "c" / ("x" * 300)
    with pytest.raises(UserError, match="cannot create it: File name too long"):
        claim.claim(out, resume=False)
    assert list(tmp_path.iterdir()) == []


def test_discard_removes_the_parents_the_run_made_too(tmp_path):
    (tmp_path / "a").mkdir()
    claim.claim(tmp_path / "a" / "b" / "c", resume=False).discard()
    assert [p.name for p in tmp_path.rglob("*")] == ["a"]


def test_an_output_replaces_a_symlink_at_its_name_never_its_target(victim, tmp_path):
    link = tmp_path / "summary.json"
    link.symlink_to(victim)
    atomic_write(link, lambda f: f.write(b"{}\n"))
    assert not link.is_symlink() and link.read_text() == "{}\n" and untouched(victim)


def test_an_output_into_a_folder_that_must_not_be_a_symlink(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "checkpoints").symlink_to(other)
    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "checkpoints" / "ckpt-000000001.h5", lambda f: f.write(b"x"),
                     follow=False)
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR) and list(other.iterdir()) == []


def test_a_metrics_line_is_never_appended_through_a_symlink(victim, tmp_path):
    log = MetricsLog(tmp_path / METRICS)
    log.rewrite([{"epoch": 0}])
    (tmp_path / METRICS).unlink()
    (tmp_path / METRICS).symlink_to(victim)
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / METRICS}"):
        log.append({"epoch": 1})
    assert untouched(victim)


def test_a_checkpoints_folder_swapped_for_a_link_mid_run_is_not_written_or_pruned(tmp_path):
    """Saving with --keep 1 would delete the other folder's older checkpoints."""
    other = tmp_path / "other"
    other.mkdir()
    theirs = [other / f"ckpt-{step:09d}.h5" for step in (1, 2)]
    for path in theirs:
        path.write_text("someone else's")
    out = tmp_path / "run" / CHECKPOINTS
    state = TrainState(params=[(np.zeros((2, 2)), np.zeros(2))], step=3)
    checkpoint.save(out, state, "{}", "data", keep=1)
    for entry in out.iterdir():
        entry.unlink()
    out.rmdir()
    out.symlink_to(other)
    with pytest.raises(OutputError, match="cannot write .*ckpt-000000003.h5"):
        checkpoint.save(out, state, "{}", "data", keep=1)
    assert sorted(other.iterdir()) == theirs
    assert all(path.read_text() == "someone else's" for path in theirs)
