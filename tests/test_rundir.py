"""The run folder: one run at a time, unique default names, and every way it can fail to be
written (a bad path, a read-only or full disk) ending in one line, a documented exit code
and nothing half-written."""

import datetime
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest

from conftest import (ROOT, error_line, frozen, launch_train, metrics_records, mnist_arrays,
                      need_root, rank_pids, run_env, run_result, trained, wait_for, write_data,
                      zero_chunk)
from distnn.rundir import checkpoint
from distnn.rundir import claim
from distnn.errors import OutputError
from distnn.rundir.metrics import MetricsLog

# a constant rate: some tests continue a run with another --epochs
ARGS = ["--train-limit", "1000", "--val-size", "100", "--epochs", "2", "--layers", "784,8,10",
        "--batch-size", "50", "--schedule", "constant"]
EXIT_BAD_INPUT, EXIT_OUTPUT = 2, 74


@contextmanager
def tmpfs(path, options):
    """A tmpfs mounted at ``path`` for the block (needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_second_run_on_a_folder_in_use_is_refused(mnist_h5, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "distnn.train", "--data", str(mnist_h5),
                              "--out", str(out), *ARGS, "--epochs", "100"], cwd=ROOT,
                             env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    holder = f"run of pid {first.pid}"
    wait_for(lambda: holder in lock_text(out), 60, "the first run to lock its folder")
    pids = rank_pids(out)
    assert pids == [first.pid]  # 100 epochs: it is far from done
    with frozen(pids):  # it holds the folder while the others try
        again = launch_train(["--data", mnist_h5, "--out", out, *ARGS], ranks=2, timeout=60)
        resumed = launch_train(["--data", mnist_h5, "--out", out, *ARGS, "--resume"], timeout=60)
        first.send_signal(signal.SIGUSR1)  # then let it stop
    for result in (again, resumed):
        assert result.returncode == EXIT_BAD_INPUT
        assert f"--out {out}: in use by {holder} on " in error_line(result)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 75, err  # undisturbed: it stops at the signal with a checkpoint
    assert json.loads((out / "config.json").read_text())["epochs"] == 100  # the first run's
    later = launch_train(["--data", mnist_h5, "--out", out, *ARGS, "--resume"], ranks=2)
    assert later.returncode == 0, later.stderr  # the lock went with the first run
    assert [r["epoch"] for r in metrics_records(out)] == [0, 1, 2]


def lock_text(out):
    try:
        return (out / ".lock").read_text()
    except OSError:
        return ""


def test_default_folders_are_unique_within_a_second(tmp_path):
    now = datetime.datetime(2026, 11, 24, 4, 51, 59)
    first = claim.unique_default(tmp_path / "runs", now)
    second = claim.unique_default(tmp_path / "runs", now)
    assert (first.name, second.name) == ("20261124-045159", "20261124-045159-2")


def test_runs_started_together_without_out_get_their_own_folders(mnist_h5, tmp_path):
    """Usually in the same second (the name clash itself is tested just above)."""
    command = [sys.executable, "-m", "distnn.train", "--data", str(mnist_h5), *ARGS]
    jobs = [subprocess.Popen(command, cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [job.communicate(timeout=120) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outs
    folders = [stdout.split("-> ")[-1].strip() for stdout, _ in outs]
    assert folders[0] != folders[1]
    for folder in folders:
        assert [r["epoch"] for r in metrics_records(tmp_path / folder)] == [0, 1, 2]
        assert run_result(tmp_path / folder) == run_result(tmp_path / folders[0])


@pytest.mark.parametrize("case", ["a file", "too long", "checkpoints in the way", "resume into a file"])
def test_an_unusable_out_is_one_line(case, mnist_h5, tmp_path):
    out = tmp_path / "run"
    extra = []
    if case == "a file":
        out.write_text("not a folder")
        message = f"--out {out}: exists and is not a folder"
    elif case == "too long":
        out = tmp_path / ("x" * 5000)
        message = "cannot create it: File name too long"
    elif case == "checkpoints in the way":
        out.mkdir()
        (out / "checkpoints").write_text("not a folder")
        extra, message = ["--resume"], f"--out {out}: checkpoints is in the way: it is a regular file, not a folder"
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
        extra, message = ["--resume"], "cannot create it: Not a directory"
    result = launch_train(["--data", mnist_h5, "--out", out, *ARGS, *extra], ranks=2, timeout=60)
    assert result.returncode == EXIT_BAD_INPUT
    line = error_line(result)
    assert message in line and len(line) < 400, line


def test_a_read_only_out_is_one_line(mnist_h5, tmp_path):
    need_root("mount a read-only file system")
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        for out, message in ((ro, "cannot write there: Read-only file system"),
                             (ro / "run", "cannot create it: Read-only file system")):
            result = launch_train(["--data", mnist_h5, "--out", out, *ARGS], ranks=2, timeout=60)
            assert result.returncode == EXIT_BAD_INPUT
            assert f"--out {out}: {message}" in error_line(result)


def test_a_full_disk_keeps_the_last_good_checkpoint_and_resumes(mnist_h5, tmp_path):
    need_root("mount a small file system")
    args = ["--data", mnist_h5, "--train-limit", "2000", "--val-size", "0", "--epochs", "1",
            "--layers", "784,256,10", "--batch-size", "32", "--checkpoint-every", "5"]
    whole = trained(args, tmp_path / "whole")
    with tmpfs(tmp_path / "small", "size=5600k") as small:  # three 1.6 MB checkpoints (W, velocity)
        out = small / "run"
        full = launch_train([*args, "--out", out], ranks=2)
        assert full.returncode == EXIT_OUTPUT, full.stderr
        line = error_line(full)
        assert f"cannot write {out}/checkpoints/ckpt-" in line and "No space left on device" in line
        assert f"continue with --resume --out {out}" in line
        assert not list(out.rglob(".*.tmp")) and not (out / "summary.json").exists()
        saved = checkpoint.listing(out / "checkpoints")
        assert [s for s, _ in saved] == [5, 10, 15]
        checkpoint.load(saved[-1][1])
        assert [r["epoch"] for r in metrics_records(out)] == [0]
        subprocess.run(["mount", "-o", "remount,size=50m", str(small)], check=True)
        resumed = launch_train([*args, "--out", out, "--resume"])
        assert resumed.returncode == 0, resumed.stderr
        assert run_result(out) == whole


def test_a_metrics_line_that_does_not_fit_is_not_half_written(tmp_path):
    need_root("mount a small file system")
    with tmpfs(tmp_path / "small", "size=64k") as small:
        log = MetricsLog(small / "metrics.jsonl")
        log.rewrite([{"epoch": 0}])
        with open(small / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 1024)
            except OSError:
                pass  # the disk is full
        before = (small / "metrics.jsonl").read_bytes()
        with pytest.raises(OutputError, match="metrics.jsonl: No space left on device"):
            log.append({"epoch": 1, "note": "x" * 20000})
        assert (small / "metrics.jsonl").read_bytes() == before


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(mnist_h5, tmp_path):
    damaged = tmp_path / "damaged-test.h5"
    write_data(damaged, *mnist_arrays(mnist_h5, 1000, 500))
    first_row = zero_chunk(damaged, "test/images", 3)
    for extra in (["--stream"], []):
        out = tmp_path / f"run{len(extra)}"
        result = launch_train(["--data", damaged, "--out", out, *ARGS, *extra], ranks=2, timeout=60)
        assert result.returncode == EXIT_BAD_INPUT
        assert f"/test/images rows {first_row}, {first_row + 1}" in error_line(result)
        assert not out.exists()


@pytest.mark.parametrize("target", ["a file", "a missing file", "a FIFO"])
def test_a_planted_lock_link_is_refused_and_nothing_outside_written(target, mnist_h5, tmp_path):
    """The adversarial case: ``ln -s /tmp/s/victim.txt /tmp/s/run/.lock`` once made the
    run overwrite the victim with its lock line (and exit 0)."""
    victim, out = tmp_path / "victim.txt", tmp_path / "run"
    if target == "a file":
        victim.write_text("IMPORTANT\n")
    elif target == "a FIFO":
        os.mkfifo(victim)
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    result = launch_train(["--data", mnist_h5, "--out", out, "--train-limit", "2000",
                           "--val-size", "200", "--epochs", "1", "--layers", "784,16,10",
                           "--quiet"], timeout=60)
    assert result.returncode == EXIT_BAD_INPUT
    assert f"--out {out}: .lock is in the way: it is a symbolic link" in error_line(result)
    if target == "a file":
        assert victim.read_text() == "IMPORTANT\n"
    assert victim.exists() == (target != "a missing file")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# sizes around the first checkpoint (about 410 kB) and the second, where HDF5 used to
# fail inside its own close (exit 1) or crash (exit 139) when it wrote to the disk itself
FULL_DISK_KB = [96, 300, 405, 410, 415, 420, 425, 430, 600, 820, 830, 840, 1000, 1150, 1300]


def test_a_disk_that_fills_at_any_point_ends_with_74_and_intact_files(mnist_h5, tmp_path):
    need_root("mount small file systems")
    args = ["--data", mnist_h5, "--train-limit", "3000", "--val-size", "300", "--epochs", "2",
            "--layers", "784,64,10", "--checkpoint-every", "5", "--keep", "2", "--quiet"]
    outcomes = {}
    for kb in FULL_DISK_KB:
        with tmpfs(tmp_path / f"disk{kb}", f"size={kb}k") as disk:
            out = disk / "run"
            result = launch_train([*args, "--out", out], timeout=120)
            outcomes[kb] = result.returncode
            assert result.returncode in (0, EXIT_OUTPUT), (kb, result.stderr)
            assert not list(out.rglob(".*.tmp")), kb
            for _, path in checkpoint.listing(out / "checkpoints"):
                checkpoint.load(path)  # whole, and it verifies
            if result.returncode == EXIT_OUTPUT:
                line = error_line(result)
                assert "No space left on device" in line and f"--resume --out {out}" in line, kb
                assert not (out / "summary.json").exists()
            else:
                assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    assert outcomes[FULL_DISK_KB[0]] == EXIT_OUTPUT and outcomes[FULL_DISK_KB[-1]] == 0, outcomes


@pytest.mark.parametrize("kb", [64, 1024, 20 * 1024, 52 * 1024])
def test_data_prep_on_a_full_disk_ends_with_74_and_leaves_nothing(kb, tmp_path):
    """The prepared file (about 56 MB) on disks too small for it: once a crash (exit 139)."""
    need_root("mount small file systems")
    with tmpfs(tmp_path / "disk", f"size={kb}k") as disk:
        out = disk / "data" / "mnist.h5"
        result = subprocess.run([sys.executable, "-m", "data_prep", "--out", str(out)], cwd=ROOT,
                                env=run_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == EXIT_OUTPUT, result.stderr
        assert f"{out}: cannot write: No space left on device" in error_line(result)
        assert list(disk.rglob("*")) in ([], [out.parent])
