"""Model files and images that distnn did not write: refused with one line, before use.

The bad files are built with h5py (or by hand) directly. ``--init`` and
``distnn.predict --model`` read model files through the same checks
(:func:`distnn.rundir.modelfile.load_model`); predict's images are checked
from their headers before they are decoded, then pixel by pixel.
"""

import os
import resource
import struct
import subprocess
import sys
import zlib
from itertools import pairwise

import h5py
import numpy as np
import pytest
from conftest import (
    ROOT,
    error_line,
    launch_train,
    mnist_arrays,
    run_env,
    run_module,
    write_data,
)

from distnn import predict

HUGE = 10**12  # a width whose float32 parameters no machine holds (784 x HUGE: 2.8 PiB)


def write_model(path, layers=(784, 10), loss="ce", change=None, **attrs):
    """A model file written with h5py: a sigmoid ``layers`` model with small random
    weights and root attributes ``attrs`` on top of the usual ones (None: left out);
    then ``change(f)`` makes it bad."""
    rng = np.random.default_rng(0)
    values = {"layers": np.array(layers), "activation": "sigmoid", "loss": loss,
              "dtype": "float32", **attrs}
    with h5py.File(path, "w") as f:
        for name, value in values.items():
            if value is not None:
                f.attrs[name] = value
        for i, (fan_in, fan_out) in enumerate(pairwise(layers)):
            f[f"layers/{i}/W"] = rng.normal(0, 0.05, (fan_in, fan_out)).astype(np.float32)
            f[f"layers/{i}/b"] = np.zeros(fan_out, np.float32)
        if change:
            change(f)
    return path


def attr(name, value):
    """A ``change`` setting the root attribute ``name``."""
    def change(f):
        f.attrs[name] = value
    return change


def replace(name, make):
    """A ``change`` putting ``make(f, name)`` (or the array ``make``) at ``name``."""
    def change(f):
        del f[name]
        if callable(make):
            make(f, name)
        else:
            f[name] = make
    return change


def sparse(shape):
    """A ``make`` for a chunked float32 dataset of ``shape`` with nothing written: tiny on disk."""
    return lambda f, name: f.create_dataset(name, shape, np.float32, chunks=(1,) * len(shape))


def poke(name, index, value):
    """A ``change`` setting one element of the dataset ``name``."""
    def change(f):
        f[name][index] = value
    return change


def huge_layers(f):
    """Layers 784, HUGE, 10, each of its arrays declared at that size and never written."""
    f.attrs["layers"] = np.array([784, HUGE, 10])
    for name, shape in {"layers/0/W": (784, HUGE), "layers/0/b": (HUGE,),
                        "layers/1/W": (HUGE, 10), "layers/1/b": (10,)}.items():
        if name in f:
            del f[name]
        sparse(shape)(f, name)


def group_at(f, name):
    f.create_group(name)


# (id, write_model's arguments, what the error line says)
BAD_MODELS = [
    ("layers-scalar", {"change": attr("layers", 784)},
     "attribute layers must be a list of two or more whole widths of at least 1, got np.int64(784)"),
    ("layers-string", {"change": attr("layers", "784,10")}, "attribute layers must be a list"),
    ("layers-float", {"change": attr("layers", np.array([784.0, 10.0]))}, "attribute layers must be a list"),
    ("W-strings", {"change": replace("layers/0/W", np.full((784, 10), b"0.5"))},
     "/layers/0/W holds |S3, not real numbers"),
    ("W-compound", {"change": replace("layers/0/W", np.zeros((784, 10), [("re", "f4"), ("im", "f4")]))},
     "/layers/0/W holds [('re', '<f4'), ('im', '<f4')], not real numbers"),
    ("W-group", {"change": replace("layers/0/W", group_at)}, "/layers/0/W is a group, not a dataset"),
    ("digit-array", {"layers": (784, 1), "loss": "bce", "positive_digit": np.array([3, 3])},
     "attribute positive_digit must be one whole number, got array([3, 3])"),
    ("digit-string", {"layers": (784, 1), "loss": "bce", "positive_digit": "3"},
     "attribute positive_digit must be one whole number, got '3'"),
    ("digit-42", {"layers": (784, 1), "loss": "bce", "positive_digit": 42},
     "distnn.train makes no such model: --positive-digit must be a digit 0-9, got 42"),
    ("bce-without-digit", {"layers": (784, 1), "loss": "bce"},
     "--loss bce trains one digit against the rest: name it with --positive-digit D"),
    ("ce-one-output", {"layers": (784, 1)}, "MNIST has 10 classes, so the output width must be 10"),
    ("ce-one-output-digit", {"layers": (784, 1), "positive_digit": 3},
     "softmax over one output is always 1"),
    ("huge-sparse-W", {"change": replace("layers/0/W", sparse((784, HUGE)))},
     f"/layers/0/W has shape (784, {HUGE}), but its layers declare (784, 10)"),
    ("huge-sparse-layers", {"change": huge_layers},
     f"its layers 784,{HUGE},10 hold {784 * HUGE + HUGE + 10 * HUGE + 10:,} parameters"),
    ("nan-W", {"change": poke("layers/0/W", (3, 4), np.nan)}, "/layers/0/W holds NaN or infinite values"),
    ("inf-b", {"change": poke("layers/0/b", 2, -np.inf)}, "/layers/0/b holds NaN or infinite values"),
]


@pytest.fixture
def rows_csv(tmp_path):
    """Three images (rows of 784 pixels) to predict."""
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(",".join(str((7 * r + c) % 256) for c in range(784))
                              for r in range(3)) + "\n")
    return path


def predicted(capsys, *args):
    """(exit code, stderr) of ``distnn.predict args`` run in this process."""
    code = predict.main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_error(code, stderr, *messages):
    """Assert predict ended with exit 2 and one line saying each of ``messages``."""
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("distnn.predict: error: ")
    assert all(message in stderr for message in messages), stderr


@pytest.mark.parametrize("kwargs, message", [c[1:] for c in BAD_MODELS], ids=[c[0] for c in BAD_MODELS])
def test_predict_refuses_a_bad_model_file(kwargs, message, rows_csv, tmp_path, capsys):
    model = write_model(tmp_path / "bad.h5", **kwargs)
    code, stderr = predicted(capsys, "--model", model, "--csv", rows_csv, "--out", tmp_path / "p.csv.gz")
    one_error(code, stderr, f"--model {model}: ", message)
    assert not (tmp_path / "p.csv.gz").exists()


def test_predict_refuses_weights_too_large_to_compute_with(rows_csv, tmp_path, capsys):
    """Finite weights near float32's limit overflow: outputs of NaN are not predictions."""
    model = write_model(tmp_path / "big.h5", change=replace("layers/0/W", np.full((784, 10), 3e38, np.float32)))
    code, stderr = predicted(capsys, "--model", model, "--csv", rows_csv, "--out", tmp_path / "p.csv.gz")
    one_error(code, stderr, "its outputs are NaN or infinite for 3 of the 3 images")


def test_predict_refuses_a_folder_as_its_model_or_data(tmp_path, capsys):
    model = write_model(tmp_path / "good.h5")
    one_error(*predicted(capsys, "--model", tmp_path), f"--model {tmp_path}: is a folder, not a regular file")
    one_error(*predicted(capsys, "--model", model, "--data", tmp_path),
              f"--data {tmp_path}: is a folder, not a regular file")


def pgm(path, pixels, maxval=255):
    """A plain (P2) PGM of 28x28 pixel words: a stroke of ``maxval`` on 0, then ``pixels``."""
    words = [str(maxval) if 300 <= i < 320 else "0" for i in range(784)]
    words[:len(pixels)] = pixels
    path.write_text(f"P2\n28 28\n{maxval}\n" + " ".join(words) + "\n")
    return path


@pytest.mark.parametrize("pixel, message", [
    ("nan", "P2 pixel 'nan' is not a whole number"), ("inf", "P2 pixel 'inf' is not a whole number"),
    ("-5", "P2 pixel '-5' is not a whole number"), ("12.5", "P2 pixel '12.5' is not a whole number"),
    ("256", "pixel value 256 is outside 0..255 (the PGM maxval)"),
])
def test_predict_refuses_pgm_pixels_outside_the_maxval(pixel, message, tmp_path, capsys):
    model = write_model(tmp_path / "good.h5")
    bad = pgm(tmp_path / "bad.pgm", [pixel])
    code, stderr = predicted(capsys, "--model", model, "--images", bad, "--out", tmp_path / "p.csv.gz")
    one_error(code, stderr, f"bad.pgm: cannot read the image ({message})")
    good = pgm(tmp_path / "good.pgm", [pixel if pixel.isdigit() else "0", "65535"], maxval=65535)
    code, stderr = predicted(capsys, "--model", model, "--images", good, "--out", tmp_path / "p.csv.gz")
    assert code == 0 and stderr == "" and (tmp_path / "p.csv.gz").exists()


def one_bit_png(path, side):
    """A black 1-bit grey PNG of ``side`` x ``side`` pixels, written with zlib: 60000 x
    60000 (3.6 billion pixels) compresses to 437 KB."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows, packer = bytes(1 + -(-side // 8)) * 1000, zlib.compressobj()
    pixels = b"".join([packer.compress(rows) for _ in range(side // 1000)] + [packer.flush()])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def test_a_huge_png_is_refused_from_its_header(tmp_path):
    """Decoding 60000 x 60000 pixels needs 14 GB as floats: under a 3 GB address-space
    limit the size must be refused from the PNG's header, before decoding."""
    model = write_model(tmp_path / "good.h5")
    image = one_bit_png(tmp_path / "huge.png", 60000)
    assert image.stat().st_size < 500_000
    limit = 3 << 30
    result = subprocess.run(
        [sys.executable, "-m", "distnn.predict", "--model", model, "--images", image],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120, check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert result.returncode == 2
    assert "huge.png: image is 60000x60000 pixels, expected 28x28 like MNIST" in error_line(result)


def release(fifo):
    """Let a process blocked opening ``fifo`` for reading go on (it then reads nothing):
    the old code blocks there, and must not be left behind."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting
        pass


def external_link(fifo):
    return replace("layers/0/W", lambda f, name: f.__setitem__(name, h5py.ExternalLink(str(fifo), "/W")))


def external_storage(fifo):
    return replace("layers/0/W", lambda f, name: f.create_dataset(
        name, (784, 10), np.float32, external=[(str(fifo), 0, h5py.h5f.UNLIMITED)]))


@pytest.mark.parametrize("case", ["model", "data", "images", "csv", "W-external-link", "W-external-storage"])
def test_predict_never_opens_a_fifo(case, tmp_path):
    """A FIFO as an input blocks open() for ever; it is refused with one line instead."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    model = write_model(tmp_path / "good.h5")
    args = {"model": ["--model", fifo], "data": ["--model", model, "--data", fifo],
            "images": ["--model", model, "--images", fifo], "csv": ["--model", model, "--csv", fifo],
            "W-external-link": ["--model", write_model(tmp_path / "l.h5", change=external_link(fifo))],
            "W-external-storage": ["--model", write_model(tmp_path / "s.h5", change=external_storage(fifo))]}
    try:
        result = run_module("distnn.predict", *args[case], "--out", tmp_path / "p.csv.gz", timeout=60)
    finally:
        release(fifo)
    assert result.returncode == 2
    line = error_line(result)
    assert (f"{fifo}: is a FIFO, not a regular file" in line if case in ("model", "data", "images", "csv")
            else "a model file holds its arrays itself" in line if case == "W-external-link"
            else "/layers/0/W keeps its values in other files" in line), line


@pytest.fixture(scope="module")
def small_h5(mnist_h5, tmp_path_factory):
    """500 training and 100 test images: the trainer's start is quick."""
    return write_data(tmp_path_factory.mktemp("data") / "small.h5", *mnist_arrays(mnist_h5, 500, 100))


INIT_CASES = {case[0]: case[1:] for case in BAD_MODELS
              if case[0] in ("layers-string", "W-group", "digit-42", "huge-sparse-layers", "nan-W")}


@pytest.mark.parametrize("case", ["folder", "fifo", *INIT_CASES])
def test_init_refuses_a_bad_model_on_every_rank(case, small_h5, tmp_path):
    """--init is read on every rank; a bad one ends them all with one line, exit 2, and
    no run folder (a NaN model is refused, not trained until it "diverges")."""
    fifo = tmp_path / "fifo"
    if case == "fifo":
        os.mkfifo(fifo)
    init, message = {"folder": (tmp_path, "is a folder, not a regular file"),
                     "fifo": (fifo, "is a FIFO, not a regular file")}.get(case, (None, None))
    if init is None:
        kwargs, message = INIT_CASES[case]
        init = write_model(tmp_path / "bad.h5", **kwargs)
    try:
        result = launch_train(["--data", small_h5, "--out", tmp_path / "run", "--layers", "784,10",
                               "--val-size", "50", "--epochs", "1", "--init", init], ranks=2, timeout=60)
    finally:
        if case == "fifo":
            release(fifo)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert f"--init {init}: " in line and message in line, line
    assert not (tmp_path / "run").exists()
