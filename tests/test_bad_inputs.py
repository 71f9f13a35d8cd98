"""The trainer's inputs that used to end in a traceback or a hang: a network that cannot
fit in memory, a --data that is a FIFO, a data file whose attributes have the wrong types
or whose datasets declare far more rows than the file holds. Each is one line and exit 2,
agreed by every rank, before anything is written."""

import os
import resource
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT, error_line, launch_train, mnist_arrays, run_env, write_data
from mpi4py import MPI

from distnn import memory
from distnn.config import Config
from distnn.data import Dataset
from distnn.errors import UserError

EXIT_BAD_INPUT = 2
MEMORY_LIMIT = 4 * 2 ** 30  # address space for a trainer child: far more than it needs


@pytest.fixture(scope="module")
def small_h5(mnist_h5, tmp_path_factory):
    """500 training and 100 test images: the trainer's start is quick."""
    return write_data(tmp_path_factory.mktemp("data") / "small.h5", *mnist_arrays(mnist_h5, 500, 100))


def test_a_network_that_cannot_fit_in_memory_is_refused_on_every_rank(small_h5, tmp_path):
    out = tmp_path / "run"
    result = launch_train(["--data", small_h5, "--out", out, "--layers", "784,100000000,10",
                           "--val-size", "50"],
                          ranks=2, timeout=60)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    line = error_line(result)
    assert "--layers 784,100000000,10 with --batch-size 256 (float32): 2 ranks on this node " \
           "need at least 4" in line, line
    assert "GB of memory (" in line and "GB is available (" in line, line
    assert not out.exists()


def test_the_estimate_names_both_figures_and_passes_what_fits(mnist_h5, monkeypatch):
    """A batch whose activations cannot fit, against a figure made small here; the default
    network and a test's fit in that figure."""
    monkeypatch.setattr(memory, "available", lambda: (10 ** 9, "the test's figure"))
    big = Config(data=str(mnist_h5), layers=(784, 20000, 10), batch_size=60000, val_size=0)
    with pytest.raises(UserError) as refused:
        memory.check(big, MPI.COMM_SELF)
    assert str(refused.value) == (
        "--layers 784,20000,10 with --batch-size 60000 (float32): it needs at least 24.8 GB of "
        "memory (parameters 0.3 GB, a step 24.5 GB, data 64.3 MB), but only 1.0 GB is "
        "available (the test's figure); use narrower layers, a smaller --batch-size or fewer "
        "ranks per node")
    for fits in (Config(data=str(mnist_h5)), Config(data=str(mnist_h5), layers=(784, 8, 10),
                                                    batch_size=64, stream=True)):
        memory.check(fits, MPI.COMM_SELF)


def test_a_cgroup_limit_counts_where_it_is_set(tmp_path):
    """The tightest limit among the process's cgroup and its ancestors, v2 ("max": none)
    or v1; a container sees its own cgroup at the mount."""
    own = tmp_path / "self-cgroup"
    own.write_text("4:memory:/job/step\n0::/job/step\n")
    leaf, parent = tmp_path / "job" / "step", tmp_path / "job"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text("max\n")
    (leaf / "memory.current").write_text("100\n")
    (parent / "memory.max").write_text(f"{2 ** 30}\n")
    (parent / "memory.current").write_text(f"{2 ** 28}\n")
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory.usage_in_bytes").write_text("5\n")
    assert memory.cgroup_room(tmp_path, own) == (2 ** 30 - 2 ** 28, str(parent / "memory.max"))
    (v1 / "memory.limit_in_bytes").write_text(f"{2 ** 29}\n")
    assert memory.cgroup_room(tmp_path, own) == (2 ** 29 - 5, str(v1 / "memory.limit_in_bytes"))
    own.write_text("0::/\n")
    assert memory.cgroup_room(tmp_path / "none", own) is None


def test_a_data_fifo_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    try:
        result = launch_train(["--data", fifo, "--out", tmp_path / "run"], timeout=60)
    finally:
        try:  # the old code blocks opening it for reading: let it go on
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert result.returncode == EXIT_BAD_INPUT
    assert error_line(result).endswith(f"--data {fifo}: is a FIFO, not a regular file")
    assert not (tmp_path / "run").exists()


def with_attribute(source, path, name, value):
    """A copy of the data file ``source`` with the attribute ``name`` ("object:attribute"
    or a root attribute) set to ``value``."""
    path.write_bytes(source.read_bytes())
    owner, _, attribute = name.rpartition(":")
    with h5py.File(path, "a") as f:
        f[owner or "/"].attrs[attribute] = value
    return path


@pytest.mark.parametrize("name, value, message", [
    ("schema_version", "2", "schema_version is '2' (a string), expected 2"),
    ("schema_version", np.array([2, 2]), "schema_version is an array int64(2,), expected 2"),
    ("schema_version", 2.0, "schema_version is 2.0 (float64), expected 2"),
    ("train/labels:sha256", np.frombuffer(b"\x12" * 32, np.uint8),
     "/train/labels attribute sha256 is an array uint8(32,), expected a SHA-256 as 64 hex digits"),
    ("test/labels:sha256", np.array([b"0" * 64] * 2),
     "/test/labels attribute sha256 is an array"),
    ("test/labels:sha256", 7, "/test/labels attribute sha256 is 7, expected a SHA-256"),
])
def test_an_attribute_of_the_wrong_type_is_named(name, value, message, small_h5, tmp_path):
    bad = with_attribute(small_h5, tmp_path / "bad.h5", name, value)
    with pytest.raises(UserError) as refused:
        Dataset(bad)
    assert str(refused.value).startswith(f"{bad}: {message}"), refused.value


def test_a_string_schema_version_ends_every_rank(small_h5, tmp_path):
    bad = with_attribute(small_h5, tmp_path / "bad.h5", "schema_version", "2")
    result = launch_train(["--data", bad, "--out", tmp_path / "run"], ranks=2, timeout=60)
    assert result.returncode == EXIT_BAD_INPUT
    assert f"{bad}: schema_version is '2' (a string), expected 2 (prepare it again" \
        in error_line(result)
    assert not (tmp_path / "run").exists()


def sparse_file(source, path, split, rows):
    """``source`` with ``split`` replaced by datasets declaring ``rows`` rows, none of them
    written: a file of a few kilobytes."""
    train_x, train_y, test_x, test_y = mnist_arrays(source)
    write_data(path, train_x, train_y, test_x, test_y)
    with h5py.File(path, "a") as f:
        del f[split]
        for kind, width in (("images", 784), ("image_sha256", 32), ("labels", None)):
            shape, chunks = ((rows, width), (16, width)) if width else ((rows,), (16384,))
            f.create_dataset(f"{split}/{kind}", shape, np.uint8, chunks=chunks)
        f[f"{split}/labels"].attrs["sha256"] = "0" * 64
    return path


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_sparse_file_declaring_a_billion_rows_is_refused(split, small_h5, tmp_path):
    """Read whole, its zeros would take 817 GB; the trainer (in an address space limited to
    MEMORY_LIMIT, so the old code's MemoryError comes soon) refuses it at once."""
    sparse = sparse_file(small_h5, tmp_path / "sparse.h5", split, 10 ** 9)
    assert sparse.stat().st_size < 2 ** 20
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    result = subprocess.run([sys.executable, "-m", "distnn.train", "--data", str(sparse),
                             "--out", str(tmp_path / "run"), "--val-size", "0"], cwd=ROOT,
                            env=run_env(), capture_output=True, text=True, timeout=120,
                            preexec_fn=limit, check=False)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-2000:]
    assert (f"{sparse}: /{split}/images declares shape (1000000000, 784) (784000000000 bytes) "
            "but stores only 0 bytes: not a complete file written by data_prep") in error_line(result)
    assert not (tmp_path / "run").exists()
