"""Shared fixtures and helpers: the prepared MNIST file, the MPI launcher, running
the project's modules, reading a run's results, waiting without fixed sleeps,
finding a run's rank processes and signalling them at a moment of the test's
choosing, and the Slurm cluster."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import pytest

from distnn import allreduce_bench
from distnn.allreduce_bench import NODES_STATE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_h5(tmp_path_factory):
    """The bundled MNIST prepared once into an HDF5 file (schema 2)."""
    out = tmp_path_factory.mktemp("data") / "mnist.h5"
    subprocess.run([sys.executable, "-m", "data_prep", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True)
    return out


def find_mpirun():
    """The launcher distnn's tools use (:func:`distnn.allreduce_bench.mpirun`) as a path,
    or None when there is none."""
    return shutil.which(allreduce_bench.mpirun())


@pytest.fixture(scope="session")
def mpirun():
    path = find_mpirun()
    if path is None:
        pytest.skip("no mpirun found beside the interpreter or on PATH")
    return path


def run_env(compiled=False):
    """Environment for child processes: the project importable, one BLAS thread, and the
    numpy reference path unless ``compiled`` (or DISTNN_KERNELS set for the whole run):
    loading numba costs each process about a second, and the tests that compare the
    two paths (test_compiled.py, the ``compiled`` variations in test_numerics.py, the
    rank counts in test_train.py) ask for it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    if compiled:
        env["DISTNN_KERNELS"] = "auto"
    env.setdefault("DISTNN_KERNELS", "numpy")
    return env


# plain SGD at a constant rate: for tests about what a short run learns, and runs continued
# from a model file (no velocity, no schedule to carry over)
PLAIN_SGD = ["--momentum", "0", "--schedule", "constant", "--warmup", "0"]
# how a run went (its times, its rank count), not what it computed
RUN_KEYS = {"samples_per_s", "compute_s", "comm_s", "data_s", "wall_s", "elapsed_s", "ranks"}


def launch_train(args, ranks=None, timeout=180, cwd=ROOT, compiled=False):
    """Run ``python -m distnn.train`` alone (ranks=None) or under ``mpirun -n ranks``
    (on the compiled path with ``compiled``: :func:`run_env`)."""
    command = [sys.executable, "-m", "distnn.train", *map(str, args)]
    if ranks is not None:
        command = [find_mpirun(), "-n", str(ranks), *command]
    return subprocess.run(command, cwd=cwd, env=run_env(compiled), capture_output=True,
                          text=True, timeout=timeout)


def run_module(module, *args, timeout=120):
    """``python -m module args...`` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          env=run_env(), capture_output=True, text=True, timeout=timeout)


def metrics_records(out):
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run_result(out):
    """(params_sha256, per-epoch metrics without RUN_KEYS) of a finished run."""
    summary = json.loads((Path(out) / "summary.json").read_text())
    return summary["params_sha256"], [{k: v for k, v in r.items() if k not in RUN_KEYS}
                                      for r in metrics_records(out)]


def trained(args, out, ranks=None):
    """The result (:func:`run_result`) of a run of ``args`` into ``out`` that must succeed."""
    result = launch_train([*args, "--out", out], ranks=ranks)
    assert result.returncode == 0, result.stderr
    return run_result(out)


def error_line(result):
    """The single error line a user sees; asserts there is exactly one and no traceback."""
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


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


def write_data(path, train_images, train_labels, test_images, test_labels):
    """A valid prepared data file (schema 2, hashes included) holding these arrays."""
    from data_prep import schema
    arrays = {("train", "images"): train_images, ("train", "labels"): train_labels,
              ("test", "images"): test_images, ("test", "labels"): test_labels}
    schema.write(path, arrays, {key: (f"{key[0]}-{key[1]}", "0" * 64) for key in arrays})
    return path


def mnist_arrays(path, n_train=None, n_test=None):
    """(train images, train labels, test images, test labels) of a prepared file."""
    with h5py.File(path, "r") as f:
        return (f["train/images"][:n_train], f["train/labels"][:n_train],
                f["test/images"][:n_test], f["test/labels"][:n_test])


def damage_chunk(path, dataset, index, damage):
    """Replace the stored bytes of one chunk of ``dataset`` with ``damage(bytes)``; return
    the chunk's first row."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(index)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        stored = f.read(info.size)
        f.seek(info.byte_offset)
        f.write(damage(stored))
    return info.chunk_offset[0]


def zero_chunk(path, dataset, index):
    """Zero one chunk on disk, its Fletcher-32 checksum included (the checksum of zeros is
    zero, so HDF5 still reads it); return its first row."""
    return damage_chunk(path, dataset, index, lambda stored: bytes(len(stored)))


def corrupt_chunk(path, dataset, index):
    """Flip bytes inside one chunk on disk (HDF5's checksum then fails); return its first row."""
    def flip(stored):
        data = bytearray(stored)
        for k in range(0, 2000, 97):
            data[5000 + k] ^= 0xFF
        return bytes(data)
    return damage_chunk(path, dataset, index, flip)


# -- rank processes and signals ------------------------------------------------------

def rank_pids(out):
    """PIDs of the Python rank processes of the run writing to ``out``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (entry.name.isdigit() and Path(argv[0].decode()).name.startswith("python")
                and b"distnn.train" in argv and str(out).encode() in argv
                and b"distnn.launcher" not in argv):  # that one starts the ranks
            pids.append(int(entry.name))
    return pids


def proc_status(pid, field):
    """A field of /proc/<pid>/status (None once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def has_signal(pid, field, signum):
    """Whether ``signum`` is in a signal mask of /proc/<pid>/status (SigCgt: caught;
    ShdPnd/SigPnd: pending)."""
    mask = proc_status(pid, field)
    return mask is not None and bool(int(mask, 16) >> (signum - 1) & 1)


def catching_ranks(out, ranks):
    """The ``ranks`` rank PIDs of the run on ``out`` once each catches SIGTERM and SIGUSR1
    (distnn.train's first lines ran), else None."""
    pids = rank_pids(out)
    if len(pids) == ranks and all(has_signal(p, "SigCgt", s) for p in pids
                                  for s in (signal.SIGTERM, signal.SIGUSR1)):
        return pids
    return None


@contextmanager
def frozen(pids):
    """The processes stopped (SIGSTOP) inside the block and continued after it."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: all((proc_status(p, "State") or "T").startswith("T") for p in pids),
                 30, "the ranks to stop")
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def deliver_while_frozen(pids, send, signum, observe=lambda: None):
    """Stop the ranks, ``send()`` ``signum`` (to them or to their launcher), wait until it is
    pending in every rank, then let them go on: the signal lands at this exact point of the
    run, however loaded the machine, instead of wherever the run has got to by then.
    Returns what ``observe()`` saw while the ranks stood still."""
    with frozen(pids):
        seen = observe()
        for pid in pids:
            assert all(has_signal(pid, "SigCgt", s) for s in (signal.SIGTERM, signal.SIGUSR1)), \
                f"rank process {pid} does not catch SIGTERM and SIGUSR1 here: they would kill it"
        send()
        wait_for(lambda: all(has_signal(p, "ShdPnd", signum) or has_signal(p, "SigPnd", signum)
                             for p in pids), 60, f"signal {signum} to reach every rank")
    return seen


# -- Slurm ---------------------------------------------------------------------------

def slurm_problem():
    """Why no Slurm cluster can run jobs here, or None if one can."""
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return "sinfo not found (no Slurm client installed)"
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if done.returncode != 0:
        return f"no Slurm controller reachable ({done.stderr.strip()})"
    working = ("idle", "mix", "alloc", "completing", "planned", "reserved")  # busy is usable
    if not any(state.startswith(working) for state in done.stdout.split()):
        return f"no usable Slurm node (states: {done.stdout.split()})"
    return None


def need_slurm():
    """Skip the calling test without a usable cluster (fail instead with DISTNN_REQUIRE_SLURM=1)."""
    problem = slurm_problem()
    if problem:
        hint = "; start one with: launch/slurm/local-cluster.sh start"
        if os.environ.get("DISTNN_REQUIRE_SLURM") == "1":
            pytest.fail(problem + hint)
        pytest.skip(problem + hint)


def need_root(why):
    if os.geteuid() != 0:
        pytest.skip(f"needs root to {why}")


# -- Simulated nodes -----------------------------------------------------------------

NODES = ROOT / "launch" / "nodes.sh"


def nodes_problem():
    """Why simulated nodes (launch/nodes.sh) cannot be brought up here, or None."""
    if os.geteuid() != 0:
        return "simulated nodes need root (network namespaces)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"simulated nodes need the {tool} command"
    return None


@pytest.fixture(scope="session")
def simulated_nodes():
    """Two simulated nodes (node1, node2; 2 slots each), brought up for the session's
    multinode tests and removed at its end; nodes that were up before are used as they
    are and left up. Skipped with the reason without root or iproute2; failed instead
    with DISTNN_REQUIRE_MULTINODE=1 (CI)."""
    problem = nodes_problem()
    if problem:
        if os.environ.get("DISTNN_REQUIRE_MULTINODE") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    hostfile = NODES_STATE / "hostfile"
    were_up = hostfile.exists() and len(hostfile.read_text().split()) >= 2  # someone's: kept
    if not were_up:
        up = subprocess.run(["bash", str(NODES), "up", "2"], capture_output=True, text=True)
        if up.returncode != 0:
            subprocess.run(["bash", str(NODES), "down"], capture_output=True)
            pytest.fail(f"launch/nodes.sh up 2 failed: {up.stderr.strip()}")
    yield NODES_STATE
    if not were_up:
        subprocess.run(["bash", str(NODES), "down"], check=True, capture_output=True, text=True)


def node_mpirun(hosts=None, *, tcp=True):
    """The mpirun command that starts ranks on simulated nodes (``hosts``: hydra's
    ``node1:2,node2:2``, or None when each MPMD block names its -host), ranks talking
    over TCP only when ``tcp``."""
    return (["env", "UCX_TLS=tcp,self"] if tcp else []) + allreduce_bench.on_nodes(hosts)
