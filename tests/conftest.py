"""Shared fixtures: the prepared MNIST file and the MPI launcher."""

import os
import shutil
import subprocess
import sys
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


def run_result(out):
    """(params_sha256, per-epoch metrics without timings) of a finished run."""
    import json
    summary = json.loads((Path(out) / "summary.json").read_text())
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return summary["params_sha256"], [{k: v for k, v in r.items() if k not in TIMING_KEYS}
                                      for r in records]
