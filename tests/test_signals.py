"""Stop signals at every moment of a run, alone, under mpirun and under srun.

A signal that comes before the last step must give exit 75 and a checkpoint at
the step the run stopped after; one that comes after it, exit 0 and the outputs
of an uninterrupted run. No signal may kill a rank, leave a job hanging (every
trial ends within 60 s) or leave a file half-written. Where a trial needs the
signal to land at one point (start-up, a checkpoint, ...), it stops the ranks
there, sends the signal, waits until every rank holds it pending and lets them
go on (``deliver_while_frozen``); those runs are long (30 epochs) and stop at the
signal, so however slowly the test itself runs, the signal lands before the end.
"""

import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (ROOT, catching_ranks, deliver_while_frozen, find_mpirun, launch_train,
                      need_slurm, rank_pids, run_env, run_result, trained, wait_for)
from distnn.rundir import checkpoint

# a constant rate, so the held trials (LONG) can resume to the 3-epoch result
ARGS = ["--train-limit", "2000", "--val-size", "200", "--epochs", "3", "--layers", "784,32,10",
        "--batch-size", "32", "--checkpoint-every", "20", "--log-every", "0", "--schedule", "constant"]
LONG = [*ARGS, "--epochs", "30"]  # the held trials: stopped long before their end
EXIT_STOPPED = 75
RANKS = {"python": 1, "mpirun": 2, "srun": 2}
# Where the ranks are held while the signal reaches them (every one must give exit 75)...
HELD = {
    "start-up": "the ranks load numpy: MPI_Init and the data load are still to come",
    "folder claimed": "the baseline evaluation and the first writes are still to come",
    "first checkpoint": "the first checkpoint is being written, or just was",
    "mid-step": "the run is 30 ms past its first checkpoint: in a step, most likely",
    "epoch end": "epoch 1's record is written: its checkpoint is still to come",
}
# ...and moments after the last step, where the signal is sent at once, repeated (exit 0)
AT_THE_END = {
    "final write": "rank 0 writes model.h5 (its temporary file is there), or just did",
    "finished": "model.h5 is there",
    "shutdown": "summary.json is there: the ranks are ending",
}
END_TRIALS = 3
trial_names = itertools.count()


@pytest.fixture(scope="module")
def uninterrupted(mnist_h5, tmp_path_factory):
    return trained(["--data", mnist_h5, *ARGS], tmp_path_factory.mktemp("uninterrupted"))


def start(launcher, out, data, args):
    train = [sys.executable, "-m", "distnn.train", "--data", str(data), "--out", str(out), *args]
    name = None
    if launcher == "mpirun":
        train = [find_mpirun(), "-n", "2", *train]
    elif launcher == "srun":
        name = f"distnn-signal-test-{out.parent.name}-{next(trial_names)}"
        train = ["srun", "-n", "2", "--mpi=pmi2", "--job-name", name, *train]
    job = subprocess.Popen(train, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    return job, name


def sender(launcher, job, name, signum):
    """How a scheduler or a user signals the run: the process itself, mpirun (which
    forwards to every rank), or Slurm's scancel to the step's tasks (srun itself ends
    its tasks at once on a SIGTERM)."""
    if launcher == "srun":
        return lambda: subprocess.run(["scancel", f"--signal={signum.name}", "--name", name],
                                      timeout=30)
    return lambda: job.send_signal(signum)


def send_at(moment, launcher, job, name, out, signum):
    """Send ``signum`` at ``moment`` of the run on ``out``."""
    if moment in AT_THE_END:
        pattern = {"final write": ".model.h5.*.tmp", "finished": "model.h5",
                   "shutdown": "summary.json"}[moment]
        wait_for(lambda: newest(out, pattern) or newest(out, "summary.json"), 60, "the run's end",
                 0.001)
        sender(launcher, job, name, signum)()
        return
    if moment == "start-up":
        wait_for(lambda: loaded_ranks(out, RANKS[launcher], "_multiarray_umath"), 60,
                 "the ranks to load numpy", 0.001)
    elif moment == "folder claimed":
        wait_for(lambda: (out / ".lock").exists(), 60, "the run to claim its folder", 0.001)
    elif moment == "epoch end":
        wait_for(lambda: len(metrics_lines(out)) == 2, 60, "epoch 1's record", 0.001)
    else:
        wait_for(lambda: newest(out / "checkpoints", ".ckpt-*.tmp")
                 or newest(out / "checkpoints", "ckpt-*.h5"), 60, "the first checkpoint", 0.001)
        if moment == "mid-step":
            time.sleep(0.03)  # choosing a point of the run, not waiting for something
    pids = rank_pids(out)
    assert len(pids) == RANKS[launcher] and not (out / "summary.json").exists()
    deliver_while_frozen(pids, sender(launcher, job, name, signum), signum)


def newest(folder, pattern):
    return sorted(Path(folder).rglob(pattern))


def metrics_lines(out):
    try:
        return (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []


def loaded_ranks(out, ranks, library):
    """The ``ranks`` rank PIDs of the run on ``out`` once each has mapped ``library``."""
    pids = rank_pids(out)
    return pids if len(pids) == ranks and all(maps(p, library) for p in pids) else None


def maps(pid, library):
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
@pytest.mark.parametrize("moment, trial", [(m, 1) for m in HELD] +
                         [(m, t) for m in AT_THE_END for t in range(1, END_TRIALS + 1)])
@pytest.mark.parametrize("launcher", list(RANKS))
def test_stop_signal_at_every_moment(launcher, moment, trial, signum, uninterrupted, mnist_h5,
                                     tmp_path):
    if launcher == "srun":
        need_slurm()
    out = tmp_path / "run"
    job, name = start(launcher, out, mnist_h5, LONG if moment in HELD else ARGS)
    try:
        send_at(moment, launcher, job, name, out, signum)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
            if name:  # srun's tasks outlive a killed srun
                subprocess.run(["scancel", "--name", name], timeout=30)
    assert job.returncode == (EXIT_STOPPED if moment in HELD else 0), err
    assert "Traceback" not in err and "Killed" not in err, err
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"
    if job.returncode == EXIT_STOPPED:
        assert f"{signum.name} received: stopped after step" in err, err
        step = int(err.split("stopped after step ")[1].split(",")[0])
        path = checkpoint.listing(out / "checkpoints")[-1][1]
        assert checkpoint.load(path)[0].step == step and f"checkpoint {path}" in err
        assert not (out / "summary.json").exists()
    else:
        assert run_result(out) == uninterrupted


def test_a_stop_in_start_up_resumes_to_the_same_result(uninterrupted, mnist_h5, tmp_path):
    """Stopped as soon as it catches the signals: a checkpoint after step 1 (when the run was
    still starting up, as it is unless this test ran very late), resumed on 2 ranks."""
    out = tmp_path / "run"
    job, _ = start("python", out, mnist_h5, LONG)
    pids = wait_for(lambda: catching_ranks(out, 1), 60, "the run to catch stop signals", 0.001)
    starting = deliver_while_frozen(pids, sender("python", job, None, signal.SIGUSR1),
                                    signal.SIGUSR1, observe=lambda: not (out / ".lock").exists())
    _, err = job.communicate(timeout=60)
    assert job.returncode == EXIT_STOPPED, err
    assert "stopped after step 1," in err or not starting, err
    resumed = launch_train(["--data", mnist_h5, "--out", out, *ARGS, "--resume"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert run_result(out) == uninterrupted


def test_a_rank_whose_peer_is_lost_at_the_end_leaves_in_bounded_time():
    """srun (without --wait) does not end the job when a rank dies: the survivor must not
    wait for it forever in MPI finalisation."""
    need_slurm()
    from distnn.parallel import FINISH_WAIT_S
    started = time.monotonic()
    result = subprocess.run(["srun", "-n", "2", "--mpi=pmi2", sys.executable,
                             str(ROOT / "tests" / "helpers" / "lost_peer_at_finish.py")],
                            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < FINISH_WAIT_S + 30, result.stderr
    assert (f"lost-peer: warning: rank 0: the other ranks did not reach the end within "
            f"{FINISH_WAIT_S} s; leaving without them") in result.stderr
    assert result.returncode != 0  # srun reports the killed rank
