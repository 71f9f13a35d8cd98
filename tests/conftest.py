"""Shared fixtures and helpers: the prepared MNIST file, the MPI launcher, running
the project's modules, reading a run's results, waiting without fixed sleeps."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_h5(tmp_path_factory):
    """The bundled MNIST prepared once into an HDF5 file (schema 1)."""
    out = tmp_path_factory.mktemp("data") / "mnist.h5"
    subprocess.run([sys.executable, "-m", "data_prep", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True)
    return out


def find_mpirun():
    """mpirun beside this Python (the mpich wheel's) or else on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else shutil.which("mpirun")


@pytest.fixture(scope="session")
def mpirun():
    path = find_mpirun()
    if path is None:
        pytest.skip("no mpirun found beside the interpreter or on PATH")
    return path


def run_env():
    """Environment for child processes: the project importable, one BLAS thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


TIMING_KEYS = {"samples_per_s", "compute_s", "comm_s", "data_s", "wall_s", "elapsed_s"}


def launch_train(args, ranks=None, timeout=180, cwd=ROOT):
    """Run ``python -m distnn.train`` alone (ranks=None) or under ``mpirun -n ranks``."""
    command = [sys.executable, "-m", "distnn.train", *map(str, args)]
    if ranks is not None:
        command = [find_mpirun(), "-n", str(ranks), *command]
    return subprocess.run(command, cwd=cwd, env=run_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_module(module, *args, timeout=120):
    """``python -m module args...`` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          env=run_env(), capture_output=True, text=True, timeout=timeout)


def metrics_records(out):
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run_result(out):
    """(params_sha256, per-epoch metrics without timings) of a finished run."""
    summary = json.loads((Path(out) / "summary.json").read_text())
    return summary["params_sha256"], [{k: v for k, v in r.items() if k not in TIMING_KEYS}
                                      for r in metrics_records(out)]


def wait_for(predicate, timeout, what, every=0.02):
    """Poll ``predicate`` every ``every`` seconds until it returns something true, and
    return that; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")
