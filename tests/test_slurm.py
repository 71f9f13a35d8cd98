"""The batch scripts on a real Slurm cluster: same bits as mpirun, requeue on signal, sweeps;
and local-cluster.sh itself: every CPU of this host, a clear word on a foreign state directory.

Start a one-node cluster with ``launch/slurm/local-cluster.sh start`` (root);
without one the batch-script tests are skipped, unless DISTNN_REQUIRE_SLURM=1 (as in
CI) makes that a failure. A test that signals a job holds the ranks still until the
signal has reached them (``deliver_while_frozen``), so the job cannot finish
before the signal lands, however loaded the machine. The tests of local-cluster.sh
need root and Slurm installed, start the cluster themselves and leave it as they
found it (running on the nodes it had, or stopped).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (ROOT, deliver_while_frozen, frozen, has_signal, need_root, need_slurm,
                      proc_status, rank_pids, run_env, run_result, trained, wait_for)
from distnn.rundir import checkpoint

pytestmark = pytest.mark.slurm
CLUSTER = ROOT / "launch" / "slurm" / "local-cluster.sh"
TRAIN_SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
STATE = Path("/var/spool/slurmctld")  # local-cluster.sh's StateSaveLocation
ARGS = ["--train-limit", "3200", "--val-size", "200", "--epochs", "3", "--layers", "784,32,10",
        "--batch-size", "32", "--checkpoint-every", "10"]


@pytest.fixture(scope="module")
def cluster():
    need_slurm()


def slurm_env(out):
    env = run_env()
    env.update(DISTNN_PYTHON=sys.executable, DISTNN_OUT=str(out))
    return env


def job_state(job):
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
    return fields.get("JobState"), int(fields.get("Restarts", 0))


def submit(mnist_h5, tmp_path, out):
    """Submit train.sbatch on 2 tasks; return its job id."""
    submitted = subprocess.run(["sbatch", "--parsable", "-n", "2", "-o", str(tmp_path / "job.out"),
                                str(TRAIN_SBATCH), "--data", str(mnist_h5), *ARGS],
                               env=slurm_env(out), capture_output=True, text=True, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


def ranks_after_first_checkpoint(out):
    """The job's two rank PIDs, once its first checkpoint exists."""
    wait_for(lambda: checkpoint.listing(out / "checkpoints"), 300, "the first checkpoint", 0.01)
    return wait_for(lambda: len(rank_pids(out)) == 2 and rank_pids(out), 60, "both ranks")


def wait_until_ended(job, timeout):
    """(final state, restart count) of ``job`` once it has ended."""
    def ended():
        state = job_state(job)
        return state if state[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None
    return wait_for(ended, timeout, "the job to end", 0.2)


@pytest.fixture(scope="module")
def direct(cluster, mnist_h5, tmp_path_factory):
    """The result of ARGS trained directly with mpirun -n 2 (every rank count gives it)."""
    return trained(["--data", mnist_h5, *ARGS], tmp_path_factory.mktemp("direct"), ranks=2)


def test_train_sbatch_matches_mpirun(direct, mnist_h5, tmp_path):
    job = subprocess.run(["sbatch", "--wait", "-n", "2", "-o", str(tmp_path / "job.out"),
                          str(TRAIN_SBATCH), "--data", str(mnist_h5), *ARGS],
                         env=slurm_env(tmp_path / "slurm"), capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    log = (tmp_path / "job.out").read_text()
    assert job.returncode == 0, job.stderr + log
    assert "on 2 tasks" in log and "distnn.train: 2 ranks" in log
    assert run_result(tmp_path / "slurm") == direct


def test_signal_requeues_and_resumes_to_the_same_result(direct, mnist_h5, tmp_path):
    out = tmp_path / "slurm"
    job = submit(mnist_h5, tmp_path, out)
    pids = ranks_after_first_checkpoint(out)
    deliver_while_frozen(pids, lambda: subprocess.run(["scancel", "--signal=USR1", "--batch", job],
                                                      check=True), signal.SIGUSR1)
    state, restarts = wait_until_ended(job, 600)
    log = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED" and restarts == 1, log
    assert "SIGUSR1 received: stopped after step" in log
    assert "requeueing" in log and "(restart 1)" in log and "resuming from" in log
    assert run_result(out) == direct


def test_plain_scancel_checkpoints_and_ends_without_requeue(cluster, mnist_h5, tmp_path):
    out = tmp_path / "slurm"
    job = submit(mnist_h5, tmp_path, out)
    pids = ranks_after_first_checkpoint(out)
    with frozen(pids):
        # Slurm sends every task SIGCONT, then at once SIGTERM: wait until it has done so
        subprocess.run(["scancel", job], check=True)
        wait_for(lambda: all(has_signal(p, "ShdPnd", signal.SIGTERM)
                             or not (proc_status(p, "State") or "").startswith("T") for p in pids),
                 60, "Slurm to signal the ranks")
    state, restarts = wait_until_ended(job, 300)
    def last_words():
        text = (tmp_path / "job.out").read_text()
        return text if "received: stopped after step" in text else None
    log = wait_for(last_words, 60, "the job's last words", 0.2)
    assert state == "CANCELLED" and restarts == 0, log
    assert "checkpointing and ending" in log and "requeueing" not in log
    step = int(log.split("stopped after step ")[1].split(",")[0])
    newest = checkpoint.listing(out / "checkpoints")[-1][1]
    assert checkpoint.load(newest)[0].step == step


def test_a_signal_as_the_job_finishes_ends_it_complete(direct, mnist_h5, tmp_path):
    """USR1 to the batch script as rank 0 writes the final model: the job either finishes
    or is requeued and finishes; never killed, never hung, nothing half-written."""
    out = tmp_path / "slurm"
    job = submit(mnist_h5, tmp_path, out)
    wait_for(lambda: list(out.glob(".model.h5.*.tmp")) or (out / "model.h5").exists(), 600,
             "the final model", 0.001)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job])
    state, restarts = wait_until_ended(job, 300)
    log = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED" and restarts in (0, 1), log
    assert run_result(out) == direct
    assert not list(out.rglob(".*.tmp")) and "Killed" not in log


def test_sweep_array_and_collected_table(cluster, mnist_h5, tmp_path):
    folder = tmp_path / "sweep"
    env = run_env()
    env["DISTNN_PYTHON"] = sys.executable
    submitted = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "submit", str(folder), "--momentum", "0.5,0.9",
         "--lr", "0.1,0.5", "--wait", "--", "--data", str(mnist_h5), "--train-limit", "1000",
         "--val-size", "100", "--epochs", "1", "--layers", "784,16,10", "--batch-size", "32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text() for p in sorted(folder.glob("task-*/job.out")))
    assert submitted.returncode == 0, submitted.stderr + logs
    assert "submitted 4 settings as job array" in submitted.stdout
    grid = [(0.1, 0.5), (0.1, 0.9), (0.5, 0.5), (0.5, 0.9)]  # lr varies slowest
    collected = subprocess.run([sys.executable, "-m", "launch.sweep", "collect", str(folder)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert collected.returncode == 0, collected.stderr
    header, _, *lines = [l for l in collected.stdout.splitlines() if l.startswith("|")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["task", "lr", "momentum", "test_acc", "val_acc", "train_loss", "epochs",
                       "steps", "status"]
    rows = [dict(zip(columns, (c.strip() for c in l.strip("|").split("|")))) for l in lines]
    assert sorted(int(r["task"]) for r in rows) == [0, 1, 2, 3]
    for row in rows:
        task = int(row["task"])
        assert (float(row["lr"]), float(row["momentum"])) == grid[task]
        config = json.loads((folder / f"task-{task}" / "config.json").read_text())
        assert (config["lr"], config["momentum"]) == grid[task]
        summary = json.loads((folder / f"task-{task}" / "summary.json").read_text())
        assert row["test_acc"] == f"{summary['test_acc']:.4f}" and row["status"] == "done"
    accuracies = [float(r["test_acc"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True) and min(accuracies) > 0
    assert (folder / "results.csv").read_text().count("\n") == 5
    assert (folder / "results.md").read_text() == collected.stdout.rstrip("\n") + "\n"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("task-")) == \
        [f"task-{i}" for i in range(4)]  # logs live inside the run folders
    assert all((folder / f"task-{i}" / "job.out").exists() for i in range(4))


# -- local-cluster.sh ------------------------------------------------------------------

def configured_nodes():
    """How many simulated nodes the cluster's slurm.conf has (0: this host alone)."""
    try:
        text = SLURM_CONF.read_text()
    except OSError:
        return 0
    return len(re.findall(r"^NodeName=node\d+ ", text, re.MULTILINE))


def local_cluster(*args, env=None):
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True,
                          timeout=120, env=env, check=False)


def cluster_start(*args, env=None):
    done = local_cluster("start", *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def slurmctld_pids():
    return subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True,
                          check=False).stdout


def output(*command):
    return subprocess.run(command, capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


@pytest.fixture
def cluster_as_found():
    """The arguments that start the cluster as it is configured now (its simulated nodes
    while it runs, else this host alone); after the test, the cluster as it was found:
    started so again, or stopped. Skipped without root or Slurm installed."""
    need_root("start the local Slurm cluster")
    if shutil.which("slurmctld") is None:
        problem = "Slurm is not installed; run: launch/slurm/local-cluster.sh install"
        if os.environ.get("DISTNN_REQUIRE_SLURM") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    running = bool(slurmctld_pids())
    nodes = configured_nodes() if running else 0
    args = ["--nodes", str(nodes)] if nodes else []
    yield args
    if running:
        cluster_start(*args)
    else:
        stopped = local_cluster("stop")
        assert stopped.returncode == 0, stopped.stderr


def test_start_gives_this_host_every_cpu_whatever_omp_num_threads(cluster_as_found):
    """OMP_NUM_THREADS=1, as clusters and distnn's own runs export it, once made the node
    claim one CPU, and ``srun -n 2`` waited for ever."""
    cpus = int(output("nproc", "--all"))
    if cpus < 2:
        pytest.skip("one CPU here: any OMP_NUM_THREADS gives the right count")
    cluster_start(*cluster_as_found, env=dict(os.environ, OMP_NUM_THREADS="1"))
    host = output("hostname", "-s")
    assert f" CPUTot={cpus} " in f" {output('scontrol', 'show', 'node', host, '-o')} "
    job = subprocess.run(["srun", "-p", "debug", "-n", "2", "hostname", "-s"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert job.returncode == 0, job.stderr
    assert job.stdout.split() == [host, host]


def test_start_refuses_another_clusters_state_in_one_line(cluster_as_found):
    """slurmctld will not start on a state directory written for another cluster name:
    start says so and how to fix it, before it touches a daemon."""
    name_file = STATE / "clustername"
    made = not STATE.exists()
    STATE.mkdir(parents=True, exist_ok=True)
    kept = name_file.read_bytes() if name_file.exists() else None
    before = slurmctld_pids()
    name_file.write_bytes(b"other-cluster")
    try:
        started = local_cluster("start", *cluster_as_found)
    finally:
        if kept is not None:
            name_file.write_bytes(kept)
        else:
            name_file.unlink()
            if made:
                STATE.rmdir()
    assert started.returncode == 2 and started.stdout == "", started.stdout + started.stderr
    assert started.stderr == (
        f"local-cluster.sh: {STATE} holds the state of another Slurm cluster, other-cluster "
        f"(this one is distnn-test), which slurmctld will not take over; move it aside "
        f"(mv {STATE} {STATE}.old) and run start again\n")
    assert slurmctld_pids() == before
