"""distnn.rundir in one process: claiming, locking, refusing, unique names, cleaning up."""

import datetime

import pytest

from distnn import rundir
from distnn.errors import UserError


def test_a_claimed_folder_is_locked_until_released(tmp_path):
    out = tmp_path / "run"
    first = rundir.claim(out, resume=False)
    assert first.created and out.is_dir() and "run of pid" in (out / ".lock").read_text()
    with pytest.raises(UserError, match=r"in use by run of pid \d+ on "):
        rundir.claim(out, resume=True)
    first.release()
    rundir.claim(out, resume=True).release()


def test_a_folder_holding_a_run_needs_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="already holds a run; add --resume"):
        rundir.claim(tmp_path, resume=False)
    folder = rundir.claim(tmp_path, resume=True)
    assert not folder.created
    folder.discard()  # not made by this run: kept
    assert (tmp_path / "metrics.jsonl").exists()


def test_discard_removes_only_a_folder_the_run_made(tmp_path):
    folder = rundir.claim(tmp_path / "new", resume=False)
    folder.discard()
    assert not (tmp_path / "new").exists()


def test_leftover_temporary_files_are_removed_on_claim(tmp_path):
    (tmp_path / ".model.h5.x1y2z3.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("mine")
    rundir.claim(tmp_path, resume=True).release()
    assert not (tmp_path / ".model.h5.x1y2z3.tmp").exists() and (tmp_path / "notes.txt").exists()


def test_default_names_are_unique_within_a_second(tmp_path):
    now = datetime.datetime(2026, 11, 24, 12, 0, 0)
    names = [rundir.unique_default(tmp_path / "runs", now).name for _ in range(3)]
    assert names == ["20261124-120000", "20261124-120000-2", "20261124-120000-3"]


def test_paths_that_cannot_be_a_run_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        rundir.claim(tmp_path / "file", resume=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(UserError, match="checkpoints is in the way"):
        rundir.claim(tmp_path / "run", resume=True)
