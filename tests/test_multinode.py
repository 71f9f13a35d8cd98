"""Ranks on two simulated nodes (launch/nodes.sh: network namespaces on a bridge) under
mpirun's hydra with launch/node-exec as its "ssh": the result equals one process's, the
ranks of different nodes talk over TCP, a lost node ends the job promptly and a resume on
the node left reproduces the uninterrupted run, and nodes with other numerics agree."""

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest

from conftest import (ROOT, frozen, node_mpirun, rank_pids, run_env, run_result, trained,
                      wait_for)
from distnn.rundir import checkpoint
from numerics_env import oldest_numpy_env, simd_off_env

pytestmark = pytest.mark.multinode

# 400 steps: the first checkpoint (step 10) comes long before the end, so the ranks held
# there are mid-run (a 44-step run ends in 0.2 s, before a test could look at it)
ARGS = ["--train-limit", "3200", "--val-size", "200", "--epochs", "4", "--layers", "784,64,10",
        "--batch-size", "32", "--checkpoint-every", "10", "--log-every", "0"]
TRAIN = [sys.executable, "-m", "distnn.train"]


@pytest.fixture(scope="module")
def reference(mnist_h5, tmp_path_factory):
    """The single-process run (no mpirun) of ARGS."""
    return trained(["--data", mnist_h5, *ARGS], tmp_path_factory.mktemp("one-process"))


def start_on_nodes(hosts, ranks, args, tcp=True):
    """``ranks`` ranks of distnn.train on the simulated nodes ``hosts``, as a Popen."""
    command = [*node_mpirun(hosts, tcp=tcp), "-n", str(ranks), *TRAIN, *map(str, args)]
    return subprocess.Popen(command, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def node_of(pid):
    """The simulated node a process runs on (its UTS namespace's hostname)."""
    return subprocess.run(["nsenter", "--target", str(pid), "--uts", "hostname"],
                          capture_output=True, text=True, check=True).stdout.strip()


def tcp_peers(node, pids):
    """(local, peer) addresses of the established TCP sockets that ``pids`` own on ``node``."""
    listing = subprocess.run(["nsenter", f"--net=/run/netns/distnn-{node}", "ss", "-tnpH",
                              "state", "established"], capture_output=True, text=True,
                             check=True).stdout
    return {(line.split()[2].rsplit(":", 1)[0], line.split()[3].rsplit(":", 1)[0])
            for line in listing.splitlines() if any(f"pid={p}," in line for p in pids)}


def stat_fields(pid):
    """/proc/<pid>/stat's fields after the command name: state, ppid, …, start time at
    index 19 (None once the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def job_processes(node, launcher):
    """(pid, start time) of each process on ``node`` that descends from ``launcher`` (the
    job's mpirun): the job's ranks and hydra's proxy, not what else runs there (a slurmd)."""
    found = set()
    for pid in subprocess.run(["ip", "netns", "pids", f"distnn-{node}"], capture_output=True,
                              text=True, check=True).stdout.split():
        fields = stat_fields(pid)
        start, ancestor = fields and fields[19], int(pid)
        while fields and ancestor not in (0, 1, launcher):
            ancestor = int(fields[1])
            fields = stat_fields(ancestor)
        if ancestor == launcher:
            found.add((int(pid), start))
    return found


def running(processes):
    """Those of ``processes`` (pid, start time) still running: not a zombie, nor a new
    process that reuses the pid."""
    return {(pid, start) for pid, start in processes
            if (fields := stat_fields(pid)) and fields[0] != "Z" and fields[19] == start}


def first_checkpoint_and_ranks(out, ranks):
    wait_for(lambda: checkpoint.listing(out / "checkpoints"), 90, "the first checkpoint")
    return wait_for(lambda: len(rank_pids(out)) == ranks and rank_pids(out), 30, "the ranks")


def test_four_ranks_on_two_nodes_talk_tcp_and_match_one_process(simulated_nodes, reference,
                                                                   mnist_h5, tmp_path):
    job = start_on_nodes("node1:2,node2:2", 4, ["--data", mnist_h5, "--out", tmp_path, *ARGS])
    pids = first_checkpoint_and_ranks(tmp_path, 4)
    with frozen(pids):  # held mid-run while its placement and sockets are looked at
        assert not (tmp_path / "summary.json").exists()
        placed = {}
        for pid in pids:
            placed.setdefault(node_of(pid), []).append(pid)
        assert sorted((n, len(p)) for n, p in placed.items()) == [("node1", 2), ("node2", 2)]
        # shared memory is off (UCX_TLS=tcp,self): node1's ranks hold sockets to node2
        pairs = tcp_peers("node1", placed["node1"])
        assert ("10.77.77.11", "10.77.77.12") in pairs | {(b, a) for a, b in pairs}
    _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert run_result(tmp_path) == reference


def test_a_lost_node_ends_the_job_and_the_other_node_resumes_it(simulated_nodes, reference,
                                                               mnist_h5, tmp_path):
    args = ["--data", mnist_h5, "--out", tmp_path, *ARGS]
    job = start_on_nodes("node1:2,node2:2", 4, args)
    ranks = first_checkpoint_and_ranks(tmp_path, 4)
    with frozen(ranks):  # mid-run, far from its end
        assert not (tmp_path / "summary.json").exists()
        left, lost = job_processes("node1", job.pid), job_processes("node2", job.pid)
        assert [len({pid for pid, _ in on_node} & set(ranks)) for on_node in (left, lost)] == [2, 2]
        died = time.monotonic()
        for pid, _ in lost:  # the job's every process on node2 at once: ranks, hydra's proxy
            with suppress(ProcessLookupError):  # gone already: the proxy's end took it along
                os.kill(pid, signal.SIGKILL)
    _, err = job.communicate(timeout=60)
    assert time.monotonic() - died < 30, err
    assert job.returncode != 0
    assert not (tmp_path / "summary.json").exists()
    wait_for(lambda: not running(left), 30, "node1's ranks to be gone too")
    resumed = subprocess.run([*node_mpirun("node1:2"), "-n", "2", *TRAIN, *map(str, args),
                              "--resume"], cwd=ROOT, env=run_env(), capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert run_result(tmp_path) == reference


def test_nodes_with_other_numerics_give_the_same_bits(simulated_nodes, reference, mnist_h5,
                                                      tmp_path):
    """node1: numpy's SIMD paths off; node2: the oldest supported numpy. MPMD blocks fill
    the hosts in order, two slots each: the first block runs on node1, the second on node2."""
    base = run_env()

    def blocks(*commands):
        out = []
        for env, command in commands:
            changed = [f"{k}={v}" for k, v in env.items() if base.get(k) != v]
            out += ([":"] if out else []) + ["-n", "2", "env", *changed, *command]
        return node_mpirun("node1:2,node2:2") + out

    simd_off, (oldest, version) = simd_off_env(base), oldest_numpy_env(base)
    if simd_off is None:
        pytest.skip("numpy dispatches to no optional CPU feature on this machine")
    probe = [sys.executable, "-c", "import os, socket, sys, numpy; open(os.path.join(sys.argv[1], "
             "str(os.getpid())), 'w').write(socket.gethostname() + ' ' + numpy.__version__)",
             str(tmp_path / "probe")]
    (tmp_path / "probe").mkdir()
    where = subprocess.run(blocks((simd_off, probe), (oldest, probe)), cwd=ROOT, env=base,
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert sorted(f.read_text() for f in (tmp_path / "probe").iterdir()) == [
        f"node1 {np.__version__}"] * 2 + [f"node2 {version}"] * 2
    train = [*TRAIN, "--data", str(mnist_h5), "--out", str(tmp_path), *ARGS]
    done = subprocess.run(blocks((simd_off, train), (oldest, train)),
                          cwd=ROOT, env=base, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert run_result(tmp_path) == reference


def test_the_nodes_script_is_idempotent_and_says_what_is_wrong(simulated_nodes):
    nodes = ["bash", str(ROOT / "launch" / "nodes.sh")]

    def run(*args, user=None):
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if user else []
        return subprocess.run([*prefix, *nodes, *args], capture_output=True, text=True, timeout=60)

    again = run("up", "2")  # already up: the same two nodes, nothing duplicated
    assert again.returncode == 0, again.stderr
    assert [line.split()[:2] for line in run("status").stdout.splitlines()[1:]] == [
        ["node1", "10.77.77.11"], ["node2", "10.77.77.12"]]
    assert (simulated_nodes / "hostfile").read_text() == "node1:2\nnode2:2\n"
    hosts = (simulated_nodes / "hosts").read_text()
    assert "10.77.77.12 node2" in hosts and "node2" not in open("/etc/hosts").read()
    on_node = run("exec", "node2", "sh", "-c", "hostname; getent hosts node1")
    assert on_node.stdout.split() == ["node2", "10.77.77.11", "node1"], on_node.stderr
    for args, message, user in ((["exec", "node7", "true"], "no simulated node node7", None),
                                (["up", "0"], "up needs a node count from 1 to 99, got '0'", None),
                                (["up", "2"], "needs root", "nobody"),
                                (["bogus"], "usage:", None)):
        result = run(*args, user=user)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
