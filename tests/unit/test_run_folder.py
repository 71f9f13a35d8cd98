"""distnn.rundir in one process: claiming, locking, refusing, unique names, cleaning up;
the files a run writes, and reading them back."""

import datetime
import json

import numpy as np
import pytest

from distnn import model, rundir
from distnn.config import Config
from distnn.errors import UserError
from distnn.rundir import checkpoint, claim, modelfile
from distnn.state import TrainState


def test_a_claimed_folder_is_locked_until_released(tmp_path):
    out = tmp_path / "run"
    first = claim.claim(out, resume=False)
    assert first.created and out.is_dir() and "run of pid" in (out / ".lock").read_text()
    with pytest.raises(UserError, match=r"in use by run of pid \d+ on "):
        claim.claim(out, resume=True)
    first.release()
    claim.claim(out, resume=True).release()


def test_a_folder_holding_a_run_needs_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="already holds a run; add --resume"):
        claim.claim(tmp_path, resume=False)
    folder = claim.claim(tmp_path, resume=True)
    assert not folder.created
    folder.discard()  # not made by this run: kept
    assert (tmp_path / "metrics.jsonl").exists()


def test_discard_removes_only_a_folder_the_run_made(tmp_path):
    folder = claim.claim(tmp_path / "new", resume=False)
    folder.discard()
    assert not (tmp_path / "new").exists()


def test_leftover_temporary_files_are_removed_on_claim(tmp_path):
    (tmp_path / ".model.h5.x1y2z3.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("mine")
    claim.claim(tmp_path, resume=True).release()
    assert not (tmp_path / ".model.h5.x1y2z3.tmp").exists() and (tmp_path / "notes.txt").exists()


def test_default_names_are_unique_within_a_second(tmp_path):
    now = datetime.datetime(2026, 11, 24, 12, 0, 0)
    names = [claim.unique_default(tmp_path / "runs", now).name for _ in range(3)]
    assert names == ["20261124-120000", "20261124-120000-2", "20261124-120000-3"]


def test_paths_that_cannot_be_a_run_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        claim.claim(tmp_path / "file", resume=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(UserError, match="checkpoints is in the way"):
        claim.claim(tmp_path / "run", resume=True)


def test_a_run_written_through_run_files_reads_back(tmp_path):
    cfg = Config(layers=(784, 5, 10))
    files = rundir.RunFiles(tmp_path, cfg.to_json(), "data-fp", keep=2)
    assert not rundir.started(tmp_path) and rundir.read_summary(tmp_path) is None
    files.start([{"epoch": 0, "val_acc": 0.1}])
    params = model.init_params(cfg.layers, 0, dtype=np.float32)
    for step in (3, 6, 9):
        files.save_checkpoint(TrainState(params=params, step=step))
    files.metrics.append({"epoch": 1, "val_acc": 0.9})
    assert rundir.started(tmp_path)
    records, config = rundir.read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1] and config == json.loads(cfg.to_json())
    assert [s for s, _ in checkpoint.listing(tmp_path / rundir.CHECKPOINTS)] == [6, 9]
    files.finish(params, cfg, {"params_sha256": "abc"})
    assert rundir.read_summary(tmp_path) == {"params_sha256": "abc"}
    loaded, attrs = modelfile.load_model(tmp_path / rundir.MODEL)
    assert attrs["layers"] == cfg.layers and np.array_equal(loaded[0][0], params[0][0])


def test_reading_a_folder_without_a_run_says_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="no such run folder"):
        rundir.read_metrics(tmp_path / "absent")
    with pytest.raises(UserError, match="no metrics.jsonl"):
        rundir.read_metrics(tmp_path)
    (tmp_path / rundir.SUMMARY).write_text("[1, 2]")
    assert rundir.read_summary(tmp_path) is None  # not a summary object
