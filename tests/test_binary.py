"""One digit against the rest (--loss bce --positive-digit D), and the epoch-0 baseline."""

import gzip
import json

import h5py
import numpy as np
import pytest

from conftest import PLAIN_SGD, launch_train, metrics_records, run_module, run_result

# 500 training rows in batches of 30: 2 and 3 ranks split every
# batch differently, and the final batch of 20 rows leaves 3 ranks uneven.
BINARY = ["--loss", "bce", "--positive-digit", "3", "--train-limit", "600", "--val-size", "100",
          "--batch-size", "30", "--epochs", "2", "--lr", "0.5"]


@pytest.mark.parametrize("layers", ["784,1", "784,16,1"])
def test_binary_run_is_identical_for_1_2_3_ranks(layers, mnist_h5, tmp_path):
    results = {}
    for ranks in (None, 2, 3):  # None: python alone, no mpirun
        out = tmp_path / f"ranks-{ranks or 1}"
        result = launch_train(["--data", mnist_h5, "--out", out, "--layers", layers, *BINARY],
                              ranks=ranks)
        assert result.returncode == 0, result.stderr
        results[ranks] = run_result(out)
    assert results[2] == results[None] and results[3] == results[None]
    with h5py.File(tmp_path / "ranks-3" / "model.h5", "r") as f:
        assert f.attrs["positive_digit"] == 3 and list(f.attrs["layers"]) == [int(w) for w in layers.split(",")]


def test_short_binary_run_beats_always_not_digit(mnist_h5, tmp_path):
    """1 epoch of a single neuron on 5,000 real images, then predict and plot its model."""
    out = tmp_path / "seven"
    result = launch_train(["--data", mnist_h5, "--out", out, "--loss", "bce",
                           "--positive-digit", "7", "--layers", "784,1", "--train-limit", "5000",
                           "--val-size", "500", "--epochs", "1", "--lr", "0.1", "--batch-size", "64", *PLAIN_SGD],
                          ranks=2)
    assert result.returncode == 0, result.stderr
    with h5py.File(mnist_h5, "r") as f:
        test_labels = f["test/labels"][...]
    always_not_seven = float(np.mean(test_labels != 7))  # 0.8972
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] > always_not_seven + 0.03, (summary["test_acc"], always_not_seven)

    predicted = run_module("distnn.predict", "--model", out / "model.h5", "--data", mnist_h5,
                           "--probabilities", "--show", "4")
    assert predicted.returncode == 0, predicted.stderr
    rows = [line.split(",") for line in
            gzip.open(out / "predictions.csv.gz", "rt").read().splitlines()]
    guesses = np.array([int(r[0]) for r in rows])
    p_seven = np.array([float(r[1]) for r in rows])
    assert len(rows) == len(test_labels) and {len(r) for r in rows} == {2}
    clear = np.abs(p_seven - 0.5) > 1e-5  # the text has 6 significant digits
    assert np.array_equal(guesses[clear], (p_seven[clear] >= 0.5).astype(int))
    accuracy = np.mean(guesses == (test_labels == 7))
    assert accuracy == summary["test_acc"]  # each image's outputs have the same bits anywhere
    assert f"accuracy {summary['test_acc']:.4f}" in predicted.stdout
    assert (out / "digits.png").stat().st_size > 0 and (out / "confusion.png").stat().st_size > 0

    plotted = run_module("distnn.plot", out)
    assert plotted.returncode == 0, plotted.stderr
    assert (out / "curves.png").stat().st_size > 0


def test_metrics_start_with_the_initial_parameters(mnist_h5, tmp_path):
    out = tmp_path / "ten"
    result = launch_train(["--data", mnist_h5, "--out", out, "--layers", "784,16,10",
                           "--train-limit", "1000", "--val-size", "200", "--epochs", "1",
                           "--batch-size", "40"], ranks=2)
    assert result.returncode == 0, result.stderr
    first, last = metrics_records(out)
    assert (first["epoch"], first["step"]) == (0, 0) and last["epoch"] == 1
    assert 0.05 < first["test_acc"] < 0.2 and 0.05 < first["val_acc"] < 0.2  # chance: 0.1
    assert "train_loss" not in first and last["test_acc"] > 0.5
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert epoch_lines[0].startswith("epoch   0/1  step      0  initial parameters  val_acc ")
    assert f"test_acc {first['test_acc']:.4f}" in epoch_lines[0] and len(epoch_lines) == 2
