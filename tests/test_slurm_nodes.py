"""The Slurm batch script over two simulated nodes: ``local-cluster.sh start --nodes 2``
runs one slurmd on each of node1 and node2 (launch/nodes.sh's network namespaces) in the
partition "nodes", and ``sbatch -N 2 -n 4 -p nodes train.sbatch`` puts two ranks on each;
they talk over TCP (UCX_TLS=tcp,self). The result equals one process's, and a USR1 requeue
resumes across the nodes to the same bits.

The module starts the node slurmds and, at its end, returns the cluster to the
configuration it found (``local-cluster.sh start`` alone: this host, partition "debug"),
so the one-node tests (tests/test_slurm.py) run as before. The requeue test holds the
ranks still while the signal reaches them, as tests/test_slurm.py does, and holds them
as soon as all four catch stop signals: in start-up, before they claim the run folder
(checked while they stand still), so the run stops after its first step of 44 and the
requeued job does the other 43 (a whole run takes 0.2 s here: waiting for a later
checkpoint would race it).
"""

import signal
import subprocess
import sys

import pytest

from conftest import (ROOT, catching_ranks, deliver_while_frozen, need_slurm, run_env,
                      run_result, trained, wait_for)
from test_slurm import cluster_start, configured_nodes

pytestmark = [pytest.mark.slurm, pytest.mark.multinode]
TRAIN_SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
ARGS = ["--train-limit", "1200", "--val-size", "100", "--epochs", "2", "--layers", "784,16,10",
        "--batch-size", "50", "--checkpoint-every", "5", "--log-every", "0"]
STEPS = 2 * (1200 - 100) // 50  # the run's last step


@pytest.fixture(scope="module")
def nodes_cluster(simulated_nodes):
    """The cluster with node1 and node2 in partition "nodes"; afterwards as it was."""
    need_slurm()
    before = configured_nodes()
    cluster_start("--nodes", "2")
    yield
    cluster_start(*(["--nodes", str(before)] if before else []))


@pytest.fixture(scope="module")
def reference(nodes_cluster, mnist_h5, tmp_path_factory):
    """The single-process run (no mpirun) of ARGS."""
    return trained(["--data", mnist_h5, *ARGS], tmp_path_factory.mktemp("one-process"))


@pytest.fixture
def submit(mnist_h5, tmp_path):
    """submit(out): train.sbatch with ARGS on 4 tasks over node1 and node2; its job id.
    Whatever is left of the job at the test's end is cancelled."""
    jobs = []

    def submit(out):
        env = run_env()
        env.update(DISTNN_PYTHON=sys.executable, DISTNN_OUT=str(out), UCX_TLS="tcp,self")
        submitted = subprocess.run(
            ["sbatch", "--parsable", "-p", "nodes", "-N", "2", "-n", "4", "-o",
             str(tmp_path / "job.out"), str(TRAIN_SBATCH), "--data", str(mnist_h5), *ARGS],
            env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        jobs.append(submitted.stdout.strip())
        return jobs[-1]

    yield submit
    for job in jobs:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)


def job_fields(job):
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                          timeout=60).stdout
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def wait_until_ended(job, timeout):
    """``scontrol show job``'s fields of ``job`` once it has ended."""
    def ended():
        fields = job_fields(job)
        return fields if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED",
                                                    "TIMEOUT", "NODE_FAIL") else None
    return wait_for(ended, timeout, f"job {job} to end", 0.2)


def node_of(pid):
    """The simulated node a process runs on (its UTS namespace's hostname)."""
    return subprocess.run(["nsenter", "--target", str(pid), "--uts", "hostname"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_four_tasks_on_two_nodes_match_one_process(reference, submit, tmp_path):
    out = tmp_path / "slurm"
    job = submit(out)
    fields = wait_until_ended(job, 90)
    log = (tmp_path / "job.out").read_text()
    assert fields["JobState"] == "COMPLETED", log
    assert (fields["NodeList"], fields["NumNodes"], fields["NumTasks"]) == ("node[1-2]", "2", "4")
    assert fields["BatchHost"] == "node1"
    assert "on 4 tasks" in log and "distnn.train: 4 ranks" in log
    assert run_result(out) == reference


def test_usr1_requeues_across_nodes_and_resumes_to_the_same_result(reference, submit, tmp_path):
    out = tmp_path / "slurm"
    job = submit(out)
    pids = wait_for(lambda: catching_ranks(out, 4), 90, "the job's 4 ranks to catch stop signals",
                    0.001)

    def placement():  # where the ranks run, and whether they are still starting up
        nodes = sorted(node_of(pid) for pid in pids)
        return nodes, not (out / ".lock").exists()

    nodes, starting = deliver_while_frozen(
        pids, lambda: subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True,
                                     timeout=60), signal.SIGUSR1, observe=placement)
    assert nodes == ["node1", "node1", "node2", "node2"]
    fields = wait_until_ended(job, 90)
    log = (tmp_path / "job.out").read_text()
    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "1"), log
    assert fields["NodeList"] == "node[1-2]" and log.count("on 4 tasks") == 2, log
    step = int(log.split("SIGUSR1 received: stopped after step ")[1].split(",")[0])
    assert 1 <= step < STEPS and (step == 1 or not starting), log
    assert "requeueing" in log and "(restart 1)" in log and "resuming from" in log
    assert run_result(out) == reference
