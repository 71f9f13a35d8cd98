"""What people look at: progress output, learning-curve plots, predictions and pictures."""

import fcntl
import gzip
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import h5py
import numpy as np
import pytest

from conftest import ROOT, launch_train, mnist_arrays, run_env, run_module, write_data
from distnn import model
from distnn.rundir import modelfile

TRAIN = ["--train-limit", "3000", "--val-size", "300", "--epochs", "2", "--layers", "784,16,10",
         "--batch-size", "32"]


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; asserts the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run_dir(mnist_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("ux") / "run"
    result = launch_train(["--data", mnist_h5, "--out", out, "--log-every", "20", *TRAIN], ranks=2)
    assert result.returncode == 0, result.stderr
    return out, result


def test_log_lines_without_control_characters_when_not_a_terminal(run_dir):
    _, result = run_dir
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    steps = [l for l in result.stdout.splitlines() if l.startswith("step ")]
    assert len(steps) == 170 // 20 and "loss" in steps[0] and "samples/s" in steps[0]  # 2 x 85 steps
    assert sum(l.startswith("epoch ") for l in result.stdout.splitlines()) == 3  # 0 (initial), 1, 2


def test_progress_bar_on_a_terminal(mnist_h5, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    job = subprocess.Popen([sys.executable, "-m", "distnn.train", "--data", str(mnist_h5),
                            "--out", str(tmp_path), *TRAIN], cwd=ROOT, env=run_env(),
                           stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert job.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "%|" in screen and "step/s" in screen and "loss=" in screen
    assert not any(l.startswith("step ") for l in screen.splitlines())


@pytest.fixture(scope="module")
def quiet_run(mnist_h5, tmp_path_factory):
    """A second run, quiet and at another learning rate (the plot compares the two)."""
    out = tmp_path_factory.mktemp("ux") / "quiet"
    result = launch_train(["--data", mnist_h5, "--out", out, "--quiet", *TRAIN, "--lr", "0.3"])
    assert result.returncode == 0, result.stderr
    return out, result


def test_quiet_prints_only_the_final_line(quiet_run):
    _, result = quiet_run
    assert result.stdout.splitlines() == [l for l in result.stdout.splitlines() if "done:" in l]
    assert len(result.stdout.splitlines()) == 1


def test_predictions_match_reported_test_accuracy(run_dir, mnist_h5):
    run, _ = run_dir
    result = run_module("distnn.predict", "--model", run / "model.h5", "--data", mnist_h5,
                        "--show", "6")
    assert result.returncode == 0, result.stderr
    lines = gzip.open(run / "predictions.csv.gz", "rt").read().splitlines()
    with h5py.File(mnist_h5, "r") as f:
        labels = f["test/labels"][...]
    assert len(lines) == len(labels) == 10000
    assert all(line in {str(d) for d in range(10)} for line in lines)
    accuracy = np.mean(np.array(lines, dtype=int) == labels)
    summary = json.loads((run / "summary.json").read_text())
    assert accuracy == summary["test_acc"]
    assert f"accuracy {summary['test_acc']:.4f}" in result.stdout
    assert png_size(run / "digits.png") == (1600, 480)
    assert png_size(run / "confusion.png") == (600, 550)


def test_probabilities_csv_rows_and_own_images(run_dir, mnist_h5, tmp_path):
    run, _ = run_dir
    with h5py.File(mnist_h5, "r") as f:
        digits = f["test/images"][:3]
    probs_out = tmp_path / "p.csv.gz"
    csv = tmp_path / "rows.csv"
    csv.write_text("\n".join(",".join(map(str, d)) for d in digits) + "\n")
    by_csv = run_module("distnn.predict", "--model", run / "model.h5", "--csv", csv,
                        "--out", probs_out, "--probabilities")
    assert by_csv.returncode == 0, by_csv.stderr
    rows = [l.split(",") for l in gzip.open(probs_out, "rt").read().splitlines()]
    assert len(rows) == 3 and all(len(r) == 11 for r in rows)
    assert all(abs(sum(map(float, r[1:])) - 1) < 1e-4 for r in rows)
    import matplotlib.pyplot as plt
    png = tmp_path / "mine.png"
    plt.imsave(png, 255 - digits[0].reshape(28, 28), cmap="gray", vmin=0, vmax=255)  # dark on light
    pgm = tmp_path / "mine.pgm"
    pgm.write_bytes(b"P5\n# a test digit\n28 28\n255\n" + digits[1].tobytes())
    wide = tmp_path / "wide.pgm"  # 16-bit samples, big-endian
    wide.write_bytes(b"P5 28 28 65535\n" + (digits[2].astype(">u2") * 257).tobytes())
    by_image = run_module("distnn.predict", "--model", run / "model.h5", "--images", png, pgm,
                          wide, "--out", tmp_path / "i.csv.gz")
    assert by_image.returncode == 0, by_image.stderr
    assert f"mine.png: {rows[0][0]} (" in by_image.stdout
    assert f"mine.pgm: {rows[1][0]} (" in by_image.stdout
    assert f"wide.pgm: {rows[2][0]} (" in by_image.stdout
    negative = run_module("distnn.predict", "--model", run / "model.h5", "--show", "-1")
    assert negative.returncode == 2 and "must be 0 or more" in negative.stderr


def test_bad_input_is_one_clear_error(run_dir, mnist_h5, tmp_path):
    run, _ = run_dir
    wrong = tmp_path / "wrong.h5"
    modelfile.save_model(wrong, model.init_params([100, 10]), [100, 10], "sigmoid", "ce")
    big = tmp_path / "big.pgm"
    big.write_bytes(b"P5 32 32 255\n" + bytes(32 * 32))
    zero = tmp_path / "zero.pgm"
    zero.write_bytes(b"P5 28 28 0\n" + bytes(28 * 28))
    unknown = tmp_path / "unknown.h5"
    modelfile.save_model(unknown, model.init_params([784, 10]), [784, 10], "swish", "ce")
    notest = write_data(tmp_path / "notest.h5", *mnist_arrays(mnist_h5, 100, 0))
    blank = tmp_path / "blank.pgm"
    blank.write_bytes(b"P5 28 28 255\n" + bytes([200]) * (28 * 28))
    cases = [
        (("distnn.predict", "--model", wrong, "--data", mnist_h5), "takes 100 inputs, but the images have 784"),
        (("distnn.predict", "--model", run / "model.h5", "--images", big), "big.pgm: image is 32x32 pixels, expected 28x28"),
        (("distnn.predict", "--model", tmp_path / "nope" / "model.h5"), "no such model file"),
        (("distnn.predict", "--model", run / "model.h5", "--images", zero), "maxval 0 is outside"),
        (("distnn.predict", "--model", unknown, "--data", mnist_h5),
         "unknown.h5: unknown activation 'swish' (distnn knows sigmoid, tanh"),
        (("distnn.predict", "--model", run / "model.h5", "--data", notest, "--show", "4"),
         "notest.h5: holds no test images to predict; give --images or --csv"),
        (("distnn.predict", "--model", run / "model.h5", "--images", blank),
         "blank.pgm: the image is blank (one grey level); nothing to recognise"),
        (("distnn.predict", "--model", run / "model.h5", "--csv", tmp_path / "rows.csv",
          "--out", tmp_path / "missing" / "p.csv.gz"),
         f"cannot write {tmp_path / 'missing' / 'p.csv.gz'}: No such file or directory"),
        (("distnn.plot", tmp_path / "nope"), "nope: no such run folder"),
        (("distnn.plot", tmp_path), "no metrics.jsonl"),
    ]
    with h5py.File(mnist_h5, "r") as f:
        digits = f["test/images"][:2]
    (tmp_path / "rows.csv").write_text("\n".join(",".join(map(str, d)) for d in digits) + "\n")
    for args, message in cases:
        result = run_module(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_missing_matplotlib_names_the_extra(run_dir):
    run, _ = run_dir
    code = ("import sys; sys.modules['matplotlib'] = None; from distnn.plot import main; "
            f"sys.exit(main([{str(run)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "pip install 'distnn[plot]'" in result.stderr


def test_a_digit_drawn_in_the_alpha_channel_is_read(run_dir, mnist_h5, tmp_path):
    """Black strokes whose shape is only in the alpha channel, on a transparent background:
    shown on a light page they are a dark digit, and predicted like the same digit in grey."""
    import matplotlib.pyplot as plt
    run, _ = run_dir
    with h5py.File(mnist_h5, "r") as f:
        digits = f["test/images"][:4]
    grey_files, alpha_files = [], []
    for i, digit in enumerate(digits):
        ink = digit.reshape(28, 28) / 255.0
        grey_files.append(tmp_path / f"grey{i}.png")
        plt.imsave(grey_files[-1], 1 - ink, cmap="gray", vmin=0, vmax=1)  # dark on light
        rgba = np.zeros((28, 28, 4))
        rgba[..., 3] = ink  # black everywhere; the digit is its opacity
        alpha_files.append(tmp_path / f"alpha{i}.png")
        plt.imsave(alpha_files[-1], rgba)
    by_grey = run_module("distnn.predict", "--model", run / "model.h5", "--images", *grey_files,
                         "--out", tmp_path / "g.csv.gz")
    by_alpha = run_module("distnn.predict", "--model", run / "model.h5", "--images", *alpha_files,
                          "--out", tmp_path / "a.csv.gz")
    assert by_grey.returncode == 0 and by_alpha.returncode == 0, by_alpha.stderr
    assert gzip.open(tmp_path / "a.csv.gz", "rt").read() == gzip.open(tmp_path / "g.csv.gz", "rt").read()
    labels = [int(l) for l in gzip.open(tmp_path / "a.csv.gz", "rt").read().split()]
    with h5py.File(mnist_h5, "r") as f:
        assert np.mean(np.array(labels) == f["test/labels"][:4]) >= 0.75
