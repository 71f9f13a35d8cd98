"""Real signals, a killed rank, and resuming on another rank count: nothing lost, same bits."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from conftest import (ROOT, corrupt_chunk, deliver_while_frozen, error_line, find_mpirun, frozen,
                      launch_train, metrics_records, rank_pids, run_env, run_result, trained,
                      wait_for)
from distnn.rundir import checkpoint

ARGS = ["--train-limit", "3200", "--val-size", "200", "--epochs", "4", "--layers", "784,64,10",
        "--batch-size", "32", "--checkpoint-every", "10"]
EXIT_STOPPED = 75


def start_train(args, ranks):
    command = [find_mpirun(), "-n", str(ranks), sys.executable, "-m", "distnn.train", *map(str, args)]
    return subprocess.Popen(command, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def ranks_at_first_checkpoint(out, ranks):
    """The run's rank PIDs once its first checkpoint exists."""
    wait_for(lambda: checkpoint.listing(Path(out) / "checkpoints"), 60, "the first checkpoint")
    return wait_for(lambda: len(rank_pids(out)) == ranks and rank_pids(out), 60, "the ranks")


@pytest.fixture(scope="module")
def reference(mnist_h5, tmp_path_factory):
    return trained(["--data", mnist_h5, *ARGS], tmp_path_factory.mktemp("uninterrupted"))


def test_sigterm_on_4_ranks_then_resume_on_1(reference, mnist_h5, tmp_path):
    job = start_train(["--data", mnist_h5, "--out", tmp_path, *ARGS], ranks=4)
    pids = ranks_at_first_checkpoint(tmp_path, 4)
    deliver_while_frozen(pids, lambda: job.send_signal(signal.SIGTERM), signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == EXIT_STOPPED, err
    assert "SIGTERM received: stopped after step" in err and f"--resume --out {tmp_path}" in err
    step = checkpoint.listing(tmp_path / "checkpoints")[-1][0]
    assert f"stopped after step {step}," in err
    resumed = launch_train(["--data", mnist_h5, "--out", tmp_path, *ARGS, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {tmp_path / 'checkpoints'}" in resumed.stdout
    assert run_result(tmp_path) == reference


def test_sigusr1_to_one_rank_stops_all(mnist_h5, tmp_path):
    job = start_train(["--data", mnist_h5, "--out", tmp_path, *ARGS], ranks=2)
    pids = ranks_at_first_checkpoint(tmp_path, 2)
    with frozen(pids):
        os.kill(pids[-1], signal.SIGUSR1)  # to one rank only; the step's agreement tells the rest
    _, err = job.communicate(timeout=60)
    assert job.returncode == EXIT_STOPPED, err
    assert "SIGUSR1 received" in err


@pytest.mark.parametrize("ranks, resume_ranks", [(2, 3), (4, 1)])
def test_killed_rank_ends_job_and_resume_matches(reference, mnist_h5, tmp_path, ranks, resume_ranks):
    job = start_train(["--data", mnist_h5, "--out", tmp_path, *ARGS], ranks=ranks)
    pids = ranks_at_first_checkpoint(tmp_path, ranks)
    killed_at = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    job.communicate(timeout=60)
    assert time.monotonic() - killed_at < 60
    assert job.returncode != 0
    newest = checkpoint.listing(tmp_path / "checkpoints")[-1][1]
    checkpoint.load(newest)  # intact: verifies its checksum
    resumed = launch_train(["--data", mnist_h5, "--out", tmp_path, *ARGS, "--resume"],
                           ranks=resume_ranks)
    assert resumed.returncode == 0, resumed.stderr
    assert run_result(tmp_path) == reference


def test_resume_skips_a_corrupt_newest_checkpoint(reference, mnist_h5, tmp_path):
    short = launch_train(["--data", mnist_h5, "--out", tmp_path, *ARGS, "--max-steps", "35"])
    assert short.returncode == 0, short.stderr
    found = checkpoint.listing(tmp_path / "checkpoints")
    assert [s for s, _ in found] == [20, 30, 35]
    found[-1][1].write_bytes(found[-1][1].read_bytes()[:1000])
    resumed = launch_train(["--data", mnist_h5, "--out", tmp_path, *ARGS, "--resume"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "warning: skipping" in resumed.stderr and "ckpt-000000035.h5" in resumed.stderr
    assert "resuming from" in resumed.stdout and "ckpt-000000030.h5" in resumed.stdout
    assert run_result(tmp_path) == reference


def test_resume_refuses_settings_that_change_the_result(mnist_h5, tmp_path):
    first = launch_train(["--data", mnist_h5, "--out", tmp_path, *ARGS, "--max-steps", "12"])
    assert first.returncode == 0, first.stderr
    changed = [a if a != "784,64,10" else "784,32,10" for a in ARGS]
    bad = launch_train(["--data", mnist_h5, "--out", tmp_path, *changed, "--lr", "0.3",
                        "--resume"], ranks=2)
    assert bad.returncode == 2
    lines = [l for l in bad.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in bad.stderr
    assert "--layers 784,64,10 -> 784,32,10" in lines[0] and "--lr 1.5 -> 0.3" in lines[0]
    fine = launch_train(["--data", mnist_h5, "--out", tmp_path, *ARGS, "--checkpoint-every", "7",
                         "--max-steps", "20", "--resume"])
    assert fine.returncode == 0, fine.stderr


def test_without_resume_an_existing_run_is_not_overwritten(mnist_h5, tmp_path):
    first = launch_train(["--data", mnist_h5, "--out", tmp_path, *ARGS, "--max-steps", "3"])
    assert first.returncode == 0
    before = (tmp_path / "summary.json").read_bytes()
    again = launch_train(["--data", mnist_h5, "--out", tmp_path, *ARGS, "--max-steps", "3"])
    assert again.returncode == 2 and "add --resume" in again.stderr
    assert (tmp_path / "summary.json").read_bytes() == before


def test_divergence_stops_cleanly_and_keeps_last_good_checkpoint(mnist_h5, tmp_path):
    result = launch_train(["--data", mnist_h5, "--out", tmp_path, "--train-limit", "2000",
                           "--val-size", "0", "--layers", "784,32,10", "--activation", "identity",
                           "--lr", "100", "--checkpoint-every", "5"], ranks=2, timeout=120)
    assert result.returncode == 3
    assert "training diverged" in result.stderr and "lower --lr" in result.stderr
    assert "Traceback" not in result.stderr
    found = checkpoint.listing(tmp_path / "checkpoints")
    assert found
    state = checkpoint.load(found[-1][1])[0]
    assert all(W.max() < float("inf") for W, _ in state.params)
    assert not (tmp_path / "summary.json").exists()


def test_divergence_on_an_epochs_last_step(mnist_h5, tmp_path):
    result = launch_train(["--data", mnist_h5, "--out", tmp_path, "--train-limit", "64",
                           "--val-size", "0", "--batch-size", "64", "--epochs", "1",
                           "--layers", "784,16,10", "--lr", "1e39"], ranks=2, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "diverged" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("max_steps", ["5", "14", "100"])
def test_resuming_a_finished_run_changes_nothing(mnist_h5, tmp_path, max_steps):
    args = ["--data", mnist_h5, "--out", tmp_path, "--train-limit", "1100", "--val-size", "200",
            "--batch-size", "100", "--epochs", "3", "--layers", "784,8,10", "--max-steps", max_steps]
    first = launch_train(args)
    assert first.returncode == 0, first.stderr
    before = json.loads((tmp_path / "summary.json").read_text()), run_result(tmp_path)
    again = launch_train([*args, "--resume"], ranks=2)
    assert again.returncode == 0, again.stderr
    after = json.loads((tmp_path / "summary.json").read_text()), run_result(tmp_path)
    assert after[1] == before[1]
    for key in ("steps", "epochs", "params_sha256", "train_loss", "val_acc", "test_acc"):
        assert after[0][key] == before[0][key], key
    records = metrics_records(tmp_path)  # the record closing the run again: the time so far
    assert records[-1]["elapsed_s"] > 0 and all("elapsed_s" in r for r in records)


def test_ranks_with_different_settings_are_refused(mnist_h5, tmp_path):
    base = [sys.executable, "-m", "distnn.train", "--data", str(mnist_h5), "--out", str(tmp_path),
            "--train-limit", "200", "--val-size", "0"]
    result = subprocess.run([find_mpirun(), "-n", "1", *base, "--lr", "0.1", ":", "-n", "1", *base,
                             "--lr", "0.2"], cwd=ROOT, env=run_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "rank 1 was started with different settings from rank 0" in result.stderr
    assert "--lr 0.1 -> 0.2" in result.stderr


def test_ranks_with_different_data_files_are_refused(mnist_h5, tmp_path):
    other = tmp_path / "other.h5"
    shutil.copy(mnist_h5, other)
    with h5py.File(other, "a") as f:
        f.attrs["sha256_train_images"] = "0" * 64
    common = ["--out", str(tmp_path / "o"), "--train-limit", "200", "--val-size", "0"]
    train = [sys.executable, "-m", "distnn.train"]
    result = subprocess.run([find_mpirun(), "-n", "1", *train, "--data", str(mnist_h5), *common,
                             ":", "-n", "1", *train, "--data", str(other), *common],
                            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "rank 1 reads a different data file" in result.stderr and "other.h5" in result.stderr


def test_unreadable_rows_are_named_mid_run_and_at_load(mnist_h5, tmp_path):
    damaged = tmp_path / "damaged.h5"
    shutil.copy(mnist_h5, damaged)
    first_row = corrupt_chunk(damaged, "train/images", 5)
    args = ["--data", damaged, "--train-limit", "3200", "--val-size", "0", "--epochs", "1",
            "--layers", "784,8,10", "--batch-size", "64", "--checkpoint-every", "0"]
    streamed = launch_train([*args, "--stream", "--out", tmp_path / "s"], ranks=2, timeout=120)
    assert streamed.returncode == 2, streamed.stderr
    named = re.search(rf"{re.escape(str(damaged))}: cannot read /train/images rows? ([\d, ]+)",
                      streamed.stderr)
    assert named, streamed.stderr
    rows = [int(r) for r in named.group(1).split(",") if r.strip()]
    assert rows and all(first_row <= r < first_row + 16 for r in rows)
    assert "epoch   1/1" not in streamed.stdout
    loaded = launch_train([*args, "--out", tmp_path / "m"], ranks=2, timeout=120)
    assert loaded.returncode == 2
    assert f"{damaged}: cannot read /train/images rows {first_row}-{first_row + 15}" in loaded.stderr


OPTIMIZER_ARGS = ["--train-limit", "1200", "--val-size", "100", "--batch-size", "50",
                  "--epochs", "3", "--layers", "784,16,10", "--lr", "0.5", "--momentum", "0.9",
                  "--weight-decay", "0.001", "--warmup", "1"]


@pytest.mark.parametrize("schedule", [["--schedule", "cosine", "--nesterov"],
                                      ["--schedule", "step", "--decay-every", "0.5"]])
def test_resume_mid_warmup_and_mid_decay_on_other_rank_counts(mnist_h5, tmp_path, schedule):
    """22 steps an epoch: stop at step 9 (warming up) on 2 ranks, at step 40 (decaying) on
    3, finish on 1: the velocity and the step's rate carry over, the bits equal one run's."""
    args = ["--data", mnist_h5, "--out", tmp_path / "run", *OPTIMIZER_ARGS, *schedule]
    whole = trained([*args[:3], tmp_path / "whole", *args[4:]], tmp_path / "whole")
    for ranks, more in ((2, ["--max-steps", "9"]), (3, ["--max-steps", "40", "--resume"]),
                        (None, ["--resume"])):
        result = launch_train([*args, *more], ranks=ranks)
        assert result.returncode == 0, result.stderr
        path, state, _, _ = checkpoint.load_latest(tmp_path / "run" / "checkpoints", print)
        assert len(state.velocity) == 2 and state.velocity[0][0].any()
    assert run_result(tmp_path / "run") == whole
    rates = [r["lr"] for r in whole[1][1:]]
    assert len(set(rates)) == 3 and 0 < rates[-1] < rates[0] <= 0.5


def test_resume_removes_what_a_killed_run_left_half_written(mnist_h5, tmp_path):
    """A run killed while writing leaves temporary files; the next run in the folder removes
    them (its lock shows no other run is writing there)."""
    args = ["--data", mnist_h5, "--out", tmp_path, "--train-limit", "600", "--val-size", "100",
            "--batch-size", "50", "--epochs", "2", "--layers", "784,8,10"]
    first = launch_train([*args, "--max-steps", "14"])
    assert first.returncode == 0, first.stderr
    left = [tmp_path / ".model.h5.k2j3h4g5.tmp", tmp_path / ".summary.json.a1b2c3d4.tmp",
            tmp_path / "checkpoints" / ".ckpt-000000015.h5.x9y8z7w6.tmp"]
    for path in left:
        path.write_bytes(b"\0" * 4096)
    resumed = launch_train([*args, "--resume"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(tmp_path.rglob(".*.tmp"))
    assert (tmp_path / "model.h5").exists() and (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("ranks", [None, 2])
def test_resume_refuses_a_checkpoint_past_the_runs_end(mnist_h5, tmp_path, ranks):
    """Fewer --epochs or --max-steps than a run already trained: one line, nothing changed
    (an older checkpoint is not taken instead: a run cannot be shortened)."""
    args = ["--data", mnist_h5, "--out", tmp_path, "--train-limit", "1100", "--val-size", "200",
            "--batch-size", "100", "--epochs", "3", "--layers", "784,8,10", "--schedule",
            "constant", "--checkpoint-every", "4"]
    first = launch_train(args)
    assert first.returncode == 0, first.stderr
    before = {name: (tmp_path / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    newest = checkpoint.listing(tmp_path / "checkpoints")[-1][1]
    for more, end in ((["--epochs", "2"], "step 18 (--epochs 2 of 9 steps)"),
                      (["--max-steps", "25"], "step 25 (--max-steps 25)")):
        shorter = launch_train([*args, *more, "--resume"], ranks=ranks, timeout=60)
        assert shorter.returncode == 2, shorter.stderr
        assert error_line(shorter) == (f"distnn.train: error: cannot resume from {newest}: it is "
                                       f"at step 27, past this run's end at {end}")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
