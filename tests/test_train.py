"""distnn.train end to end: bit-identical results for 1..8 ranks, failures that end promptly."""

import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import (PLAIN_SGD, ROOT, error_line, find_mpirun, launch_train, metrics_records, mnist_arrays,
                      run_env, run_result, write_data)

# Small, fast settings that still exercise every corner: several hidden layers,
# a batch size that 3, 4, 6, 7 and 8 do not divide, a final partial batch
# (530 training rows = 10 x 50 + 30), two epochs so the shuffle is exercised, and
# each optimizer setting: Nesterov momentum with weight decay, a warm-up and the
# cosine; heavy-ball momentum with weight decay and the step schedule.
CONFIGS = {
    "float32-shuffled": ["--layers", "784,16,12,10", "--batch-size", "50",
                         "--train-limit", "630", "--val-size", "100", "--epochs", "2",
                         "--lr", "0.5", "--dtype", "float32", "--momentum", "0.9", "--nesterov",
                         "--weight-decay", "0.001", "--schedule", "cosine", "--warmup", "0.5"],
    "float64-ordered": ["--layers", "784,20,10,10", "--activation", "tanh", "--batch-size", "45",
                        "--train-limit", "600", "--val-size", "37", "--epochs", "2", "--lr", "0.1",
                        "--dtype", "float64", "--no-shuffle", "--momentum", "0.8",
                        "--weight-decay", "0.0001", "--schedule", "step", "--decay-every", "0.5",
                        "--decay-factor", "0.5"],
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def reference(request, mnist_h5, tmp_path_factory):
    """The single-process run (no mpirun) of one configuration."""
    out = tmp_path_factory.mktemp("ref") / request.param
    result = launch_train(["--data", mnist_h5, "--out", out, *CONFIGS[request.param]])
    assert result.returncode == 0, result.stderr
    return request.param, run_result(out)


@pytest.mark.parametrize("ranks", range(1, 9))
def test_every_rank_count_matches_single_process(reference, ranks, mnist_h5, tmp_path):
    """The single process on the numpy reference path; the ranks on the compiled path
    where numba is installed (distnn.compiled), which must change no bit either."""
    name, (digest, metrics) = reference
    extra = ["--stream"] if ranks % 2 else []   # streamed and in-memory reads agree too
    result = launch_train(["--data", mnist_h5, "--out", tmp_path, *CONFIGS[name], *extra],
                          ranks=ranks, compiled=True)
    assert result.returncode == 0, result.stderr
    got_digest, got_metrics = run_result(tmp_path)
    assert got_digest == digest
    assert got_metrics == metrics
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == ranks


def test_outputs_and_single_config_print(mnist_h5, tmp_path):
    result = launch_train(["--data", mnist_h5, "--out", tmp_path, "--train-limit", "300",
                           "--val-size", "50", "--epochs", "2", "--layers", "784,8,10",
                           "--max-steps", "12", "--batch-size", "32"], ranks=3)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("layers           =") == 1
    assert result.stdout.count("epoch ") == 3  # epoch 0 (initial parameters), 1, 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["epochs"] == 2 and summary["world_size"] == 3
    records = metrics_records(tmp_path)
    assert [r["step"] for r in records] == [0, 8, 12]
    for key in ("train_loss", "train_acc",
                "val_acc", "test_acc", "test_quadratic_cost", "test_cross_entropy",
                "samples_per_s", "compute_s", "comm_s", "data_s"):
        assert key in records[1]
    with h5py.File(tmp_path / "model.h5", "r") as f:
        assert list(f.attrs["layers"]) == [784, 8, 10]
        assert f.attrs["activation"] == "sigmoid" and f.attrs["loss"] == "ce"
        assert f.attrs["dtype"] == "float32"
        blob = b"".join(f[f"layers/{i}/{p}"][...].tobytes() for i in range(2) for p in "Wb")
    import hashlib
    assert hashlib.sha256(blob).hexdigest() == summary["params_sha256"]


def test_init_from_model_file(mnist_h5, tmp_path):
    """1 epoch, then 1 more from its model.h5, equals 2 epochs (in file order) bit for bit."""
    common = ["--data", mnist_h5, "--train-limit", "200", "--val-size", "0", "--layers",
              "784,8,10", "--batch-size", "20", "--no-shuffle", *PLAIN_SGD]
    first = launch_train([*common, "--epochs", "1", "--out", tmp_path / "a"])
    two = launch_train([*common, "--epochs", "2", "--out", tmp_path / "two"])
    second = launch_train([*common, "--epochs", "1", "--out", tmp_path / "b",
                           "--init", tmp_path / "a" / "model.h5"], ranks=2)
    assert first.returncode == two.returncode == second.returncode == 0, second.stderr
    assert run_result(tmp_path / "b")[0] == run_result(tmp_path / "two")[0]
    assert run_result(tmp_path / "b")[0] != run_result(tmp_path / "a")[0]


def test_default_data_is_prepared_when_missing(tmp_path):
    result = launch_train(["--train-limit", "100", "--val-size", "0", "--epochs", "1",
                           "--layers", "784,4,10", "--out", "run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "mnist.h5").is_file()
    assert (tmp_path / "run" / "summary.json").is_file()


def test_exception_on_one_rank_ends_the_job_promptly(mnist_h5, tmp_path):
    import subprocess
    import sys
    start = time.monotonic()
    result = subprocess.run(
        [find_mpirun(), "-n", "4", sys.executable, str(ROOT / "tests" / "helpers" / "fail_on_rank.py"),
         "2", "3", "--data", str(mnist_h5), "--out", str(tmp_path), "--train-limit", "2000",
         "--val-size", "0", "--epochs", "50", "--layers", "784,8,10"],
        env=run_env(), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 2 failed" in result.stderr
    assert "deliberate failure on rank 2 at step 3" in result.stderr
    assert elapsed < 30, elapsed
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--block-size", "8"], "unrecognized arguments: --block-size 8"),
    (["--momentum", "1"], "--momentum must be at least 0 and below 1, got 1.0"),
])
def test_bad_settings_give_one_error_line(args, message, mnist_h5, tmp_path):
    """Through a launch: every rank ends with exit 2, one line, nothing written (the
    settings' messages themselves: tests/unit/test_settings.py)."""
    result = launch_train(["--data", mnist_h5, "--out", tmp_path / "o", *args], ranks=3, timeout=60)
    assert result.returncode == 2
    assert message in error_line(result)
    assert not (tmp_path / "o").exists()


def test_missing_and_wrong_schema_data_files(tmp_path):
    missing = launch_train(["--data", tmp_path / "nope.h5", "--out", tmp_path / "o"], ranks=2,
                           timeout=60)
    assert missing.returncode == 2
    assert "nope.h5: no such file" in error_line(missing)
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.attrs["schema_version"] = 2
        f["train/images"] = np.zeros((10, 28, 28), np.uint8)
    bad = launch_train(["--data", wrong, "--out", tmp_path / "o"], ranks=2, timeout=60)
    assert bad.returncode == 2
    assert "wrong.h5: missing /train/images, /train/labels or /train/image_sha256" in error_line(bad)
    with h5py.File(wrong, "w") as f:
        f.attrs["schema_version"] = 1
    old = launch_train(["--data", wrong, "--out", tmp_path / "o"], ranks=2, timeout=60)
    assert old.returncode == 2
    assert (f"wrong.h5: schema_version is 1, expected 2 (prepare it again: python -m data_prep "
            f"--force --out {wrong})") in error_line(old)
    assert not (tmp_path / "o").exists()


def test_init_with_other_layer_sizes_is_refused(mnist_h5, tmp_path):
    from distnn import model
    from distnn.rundir import modelfile
    params = model.init_params([784, 30, 10])
    modelfile.save_model(tmp_path / "m.h5", params, [784, 30, 10], "sigmoid", "ce")
    result = launch_train(["--data", mnist_h5, "--out", tmp_path / "o", "--init", tmp_path / "m.h5",
                           "--layers", "784,16,10"], ranks=2, timeout=60)
    assert result.returncode == 2
    assert "its layers 784,30,10 do not match --layers 784,16,10" in error_line(result)
    assert not (tmp_path / "o").exists()


def test_batch_smaller_than_rank_count(mnist_h5, tmp_path):
    """Batches of 2 rows on 3 ranks: one rank has no rows in every step and still
    takes part; the result is the single process's."""
    common = ["--data", mnist_h5, "--batch-size", "2", "--train-limit", "40", "--val-size", "5",
              "--epochs", "1", "--layers", "784,8,10"]
    single = launch_train([*common, "--out", tmp_path / "one"])
    three = launch_train([*common, "--out", tmp_path / "three"], ranks=3, timeout=60)
    assert single.returncode == three.returncode == 0, three.stderr
    assert run_result(tmp_path / "three") == run_result(tmp_path / "one")


def test_a_bad_flag_on_one_rank_ends_every_rank(mnist_h5, tmp_path):
    import subprocess
    import sys
    base = [sys.executable, "-m", "distnn.train", "--data", str(mnist_h5), "--out", str(tmp_path / "o")]
    result = subprocess.run([find_mpirun(), "-n", "1", *base, "--lr", "0.1", ":", "-n", "1", *base,
                             "--lr", "-1"], env=run_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "rank 1: --lr must be positive, got -1.0" in error_line(result)
    unknown = launch_train(["--data", mnist_h5, "--learning-rate", "3"], ranks=2, timeout=60)
    assert unknown.returncode == 2
    assert "unrecognized arguments: --learning-rate 3" in error_line(unknown)


def test_labels_outside_range_in_data_file(mnist_h5, tmp_path):
    import shutil
    bad = tmp_path / "bad.h5"
    shutil.copy(mnist_h5, bad)
    with h5py.File(bad, "a") as f:
        f["train/labels"][17] = 12
    for extra in ([], ["--stream"]):
        result = launch_train(["--data", bad, "--out", tmp_path / "o", "--train-limit", "100",
                               "--val-size", "0", "--batch-size", "100",
                               *extra], ranks=2, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "/train/labels: label 12 at index 17 is outside 0-9" in result.stderr
    with h5py.File(mnist_h5, "r") as f:
        label = int(f["train/labels"][17])
    with h5py.File(bad, "a") as f:  # another digit: in range, but not the recorded content
        f["train/labels"][17] = (label + 1) % 10
    result = launch_train(["--data", bad, "--out", tmp_path / "o", "--val-size", "0"], ranks=2,
                          timeout=60)
    assert result.returncode == 2
    assert f"{bad}: /train/labels do not match the SHA-256 data_prep recorded" in error_line(result)


def test_empty_test_split_is_reported_as_absent(mnist_h5, tmp_path):
    train_x, train_y, _, _ = mnist_arrays(mnist_h5, 300, 0)
    small = write_data(tmp_path / "notest.h5", train_x, train_y, np.zeros((0, 784), np.uint8),
                       np.zeros(0, np.uint8))
    result = launch_train(["--data", small, "--out", tmp_path / "o", "--val-size", "50",
                           "--epochs", "1", "--layers", "784,8,10"], ranks=2, timeout=60)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["test_acc"] is None and summary["val_acc"] is not None


def test_a_wrong_kernels_choice_is_one_line_and_writes_nothing(mnist_h5, tmp_path):
    """DISTNN_KERNELS names the compiled path's use (distnn.compiled); a mistake in it, on
    any rank, ends the job with one line before anything is written."""
    done = subprocess.run([find_mpirun(), "-n", "1", sys.executable, "-m", "distnn.train",
                           "--data", str(mnist_h5), "--out", str(tmp_path / "run"), ":",
                           "-n", "1", "env", "DISTNN_KERNELS=fast", sys.executable, "-m",
                           "distnn.train", "--data", str(mnist_h5), "--out",
                           str(tmp_path / "run")], env=run_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == ("distnn.train: error: rank 1: DISTNN_KERNELS='fast': "
                           "choose auto or numpy\n")
    assert not (tmp_path / "run").exists()
