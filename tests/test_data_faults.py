"""Damaged, blank and changing data: every fault named in one line, nothing trained on garbage,
and blank images trained like any others."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import (ROOT, error_line, frozen, launch_train, metrics_records, mnist_arrays,
                      rank_pids, run_env, run_result, wait_for, write_data, zero_chunk)
from distnn.rundir import checkpoint

EXIT_BAD_INPUT = 2
ARGS = ["--train-limit", "3200", "--val-size", "0", "--epochs", "1", "--layers", "784,8,10",
        "--batch-size", "64", "--checkpoint-every", "0"]


def test_a_block_zeroed_with_its_checksum_is_named(mnist_h5, tmp_path):
    """Fletcher-32 of zeros is zero, so HDF5 reads a zeroed chunk without complaint; the rows'
    SHA-256 does not match, in memory at load and streamed mid-run."""
    damaged = tmp_path / "zeroed.h5"
    shutil.copy(mnist_h5, damaged)
    first = zero_chunk(damaged, "train/images", 7)
    rows = f"/train/images rows {first}, {first + 1}, {first + 2}, {first + 3}, {first + 4}, ..."
    loaded = launch_train(["--data", damaged, "--out", tmp_path / "m", *ARGS], ranks=2)
    assert loaded.returncode == EXIT_BAD_INPUT
    assert f"{damaged}: {rows} (16 rows) do not match the SHA-256" in error_line(loaded)
    streamed = launch_train(["--data", damaged, "--out", tmp_path / "s", *ARGS, "--stream"],
                            ranks=2)
    assert streamed.returncode == EXIT_BAD_INPUT
    named = re.search(rf"{re.escape(str(damaged))}: /train/images rows? ([\d, ]+) does? not match",
                      error_line(streamed))
    assert named and all(first <= int(r) < first + 16 for r in named.group(1).split(", "))
    assert "epoch   1/1" not in streamed.stdout and not (tmp_path / "s" / "summary.json").exists()


def test_a_batch_of_blank_images_trains_the_same_on_every_rank_count(mnist_h5, tmp_path):
    train_x, train_y, test_x, test_y = mnist_arrays(mnist_h5, 640, 500)
    train_x = train_x.copy()
    train_x[:64] = 0  # the first global batch: no pixel set in any row
    blank = write_data(tmp_path / "blank64.h5", train_x, train_y, test_x, test_y)
    args = ["--data", blank, "--val-size", "0", "--no-shuffle", "--epochs", "2",
            "--layers", "784,16,10"]
    results = []
    for ranks, extra in ((None, []), (2, []), (3, ["--stream"])):
        out = tmp_path / f"run{ranks}"
        result = launch_train([*args, "--out", out, *extra], ranks=ranks)
        assert result.returncode == 0, result.stderr
        results.append(run_result(out))
    assert results[0] == results[1] == results[2]
    assert results[0][1][-1]["test_acc"] > 0.5


@pytest.mark.parametrize("change", ["truncated", "replaced"])
def test_data_changed_under_a_streamed_run_is_named(change, mnist_h5, tmp_path):
    data = tmp_path / "data.h5"
    shutil.copy(mnist_h5, data)
    out = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-m", "distnn.train", "--data", str(data), "--out", str(out), "--stream",
         "--train-limit", "20000", "--val-size", "500", "--epochs", "2", "--layers", "784,16,10",
         "--batch-size", "32", "--checkpoint-every", "20"],
        cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: checkpoint.listing(out / "checkpoints"), 60, "the first checkpoint")
    with frozen(rank_pids(out)):
        if change == "truncated":
            with open(data, "r+b") as f:
                f.truncate(0)
        else:  # overwritten in place by a file of the same layout and other pixels
            other = write_data(tmp_path / "other.h5", *[255 - a if a.ndim == 2 else a
                                                       for a in mnist_arrays(mnist_h5)])
            with open(other, "rb") as src, open(data, "r+b") as dst:
                dst.truncate(0)
                shutil.copyfileobj(src, dst)
    _, err = job.communicate(timeout=120)
    assert job.returncode == EXIT_BAD_INPUT, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and f"{data}: " in lines[0] and "/train/images rows" in lines[0], err
    newest = checkpoint.listing(out / "checkpoints")[-1][1]
    checkpoint.load(newest)  # the last good checkpoint verifies
    assert not (out / "summary.json").exists() and not list(out.rglob(".*.tmp"))
    assert [r["epoch"] for r in metrics_records(out)] == [0]


def test_a_file_without_training_images_says_so(mnist_h5, tmp_path):
    _, _, test_x, test_y = mnist_arrays(mnist_h5, 0, 100)
    empty = write_data(tmp_path / "notrain.h5", np.zeros((0, 784), np.uint8),
                       np.zeros(0, np.uint8), test_x, test_y)
    result = launch_train(["--data", empty, "--out", tmp_path / "o", "--val-size", "0"], ranks=2)
    assert result.returncode == EXIT_BAD_INPUT
    assert error_line(result).endswith(f"{empty}: holds no training images")


def test_a_train_limit_beyond_the_file_is_said_once(mnist_h5, tmp_path):
    small = write_data(tmp_path / "small.h5", *mnist_arrays(mnist_h5, 300, 100))
    result = launch_train(["--data", small, "--out", tmp_path / "o", "--train-limit", "1000000",
                           "--val-size", "50", "--epochs", "1", "--layers", "784,8,10",
                           "--batch-size", "64"], ranks=2)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning:") == 1
    assert (f"--train-limit 1000000: {small} holds only 300 training images; using all of them"
            in result.stderr)
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["steps"] == 4  # 250 rows
