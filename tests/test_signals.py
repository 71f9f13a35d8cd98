"""Stop signals at every moment of a run, alone, under mpirun and under srun.

A signal that comes before the last step must give exit 75 (SIGTERM, SIGUSR1),
130 (SIGINT: Ctrl-C) or 129 (SIGHUP) and a checkpoint at the step the run
stopped after, from which --resume reaches an uninterrupted run's result; one
that comes after it, exit 0 and the outputs of an uninterrupted run. No signal
may kill a rank, leave a job hanging (every trial ends within 60 s), print a
traceback or leave a file half-written. Where a trial needs the signal to land
at one point (start-up, a checkpoint, ...), it stops the ranks there, sends the
signal, waits until every rank holds it pending and lets them go on
(``deliver_while_frozen``); those runs are long (30 epochs) and stop at the
signal, so however slowly the test itself runs, the signal lands before the end.
"""

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import (ROOT, catching_ranks, deliver_while_frozen, find_mpirun, frozen, has_signal,
                      launch_train, need_slurm, rank_pids, run_env, run_result, trained, wait_for)
from distnn.rundir import checkpoint

# a constant rate, so the held trials (LONG) can resume to the 3-epoch result
ARGS = ["--train-limit", "2000", "--val-size", "200", "--epochs", "3", "--layers", "784,32,10",
        "--batch-size", "32", "--checkpoint-every", "20", "--log-every", "0", "--schedule", "constant"]
LONG = [*ARGS, "--epochs", "30"]  # the held trials: stopped long before their end
EXIT_STOPPED = 75
EXIT_CODES = {signal.SIGTERM: 75, signal.SIGUSR1: 75, signal.SIGINT: 130, signal.SIGHUP: 129}
RANKS = {"python": 1, "mpirun": 2, "srun": 2}
# Where the ranks are held while the signal reaches them (each must stop: exit 75, 130, 129)...
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


def start(launcher, out, data, args, ignored=(), stdout=subprocess.PIPE,
          program=("-m", "distnn.train")):
    """The run, in a session of its own (as a shell job has its process group), with
    SIGINT and SIGHUP at their default or ``ignored`` (as nohup does), however pytest
    itself was started."""
    train = [sys.executable, *program, "--data", str(data), "--out", str(out), *args]
    name = None
    if launcher == "mpirun":
        train = [find_mpirun(), "-n", "2", *train]
    elif launcher == "srun":
        name = f"distnn-signal-test-{out.parent.name}-{next(trial_names)}"
        train = ["srun", "-n", "2", "--mpi=pmi2", "--job-name", name, *train]
    job = subprocess.Popen([sys.executable, "-c", WITH_SIGNALS, ",".join(s.name for s in ignored),
                            *train], cwd=ROOT, env=run_env(), stdout=stdout,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    return job, name


# python -c WITH_SIGNALS IGNORED COMMAND...: SIGINT and SIGHUP ignored if named in IGNORED,
# else at their default action, then exec COMMAND (which keeps them so)
WITH_SIGNALS = """import os, signal, sys
for signum in (signal.SIGINT, signal.SIGHUP):
    ignored = signum.name in sys.argv[1].split(",")
    signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def sender(launcher, job, name, signum):
    """How a scheduler or a user signals the run: the process itself, mpirun (which
    forwards to every rank), or Slurm's scancel to the step's tasks (srun itself ends
    its tasks at once on a SIGTERM)."""
    if launcher == "srun":
        return lambda: subprocess.run(["scancel", f"--signal={signum.name}", "--name", name],
                                      timeout=30)
    return lambda: job.send_signal(signum)


def send_at(moment, launcher, job, name, out, signum, send=None):
    """Send ``signum`` at ``moment`` of the run on ``out`` (with ``send()``, else as
    :func:`sender` does)."""
    send = send or sender(launcher, job, name, signum)
    if moment in AT_THE_END:
        pattern = {"final write": ".model.h5.*.tmp", "finished": "model.h5",
                   "shutdown": "summary.json"}[moment]
        wait_for(lambda: newest(out, pattern) or newest(out, "summary.json"), 60, "the run's end",
                 0.001)
        send()
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
    deliver_while_frozen(pids, send, signum)


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
    check_outcome(*run_trial(launcher, moment, signum, out, mnist_h5), out, moment, signum,
                  uninterrupted)


def run_trial(launcher, moment, signum, out, data, target=None):
    """Start a run on ``out``, send it ``signum`` at ``moment`` (to ``target``, else as
    :func:`sender` does); its exit code and stderr once it ended."""
    job, name = start(launcher, out, data, LONG if moment in HELD else ARGS)
    try:
        send_at(moment, launcher, job, name, out, signum,
                target and (lambda: TARGETS[target](job, out, signum)))
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
            if name:  # srun's tasks outlive a killed srun
                subprocess.run(["scancel", "--name", name], timeout=30)
    return job.returncode, err


def check_outcome(code, err, out, moment, signum, uninterrupted):
    """A stop with a checkpoint and ``signum``'s exit code before the last step, the
    finished run after it; nothing killed, no traceback, nothing half-written."""
    assert code == (EXIT_CODES[signum] if moment in HELD else 0), err
    assert "Traceback" not in err and "Killed" not in err, err
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"
    if moment in HELD:
        assert f"{signum.name} received: stopped after step" in err, err
        assert f"continue with --resume --out {out}" in err, err
        step = int(err.split("stopped after step ")[1].split(",")[0])
        path = checkpoint.listing(out / "checkpoints")[-1][1]
        assert checkpoint.load(path)[0].step == step and f"checkpoint {path}" in err
        assert not (out / "summary.json").exists()
    else:
        assert run_result(out) == uninterrupted


TARGETS = {  # whom a trial sends its signal to
    "process": lambda job, out, signum: job.send_signal(signum),  # the process, or mpirun
    "group": lambda job, out, signum: os.killpg(job.pid, signum),  # a terminal's Ctrl-C
    "ranks": lambda job, out, signum: [os.kill(pid, signum) for pid in rank_pids(out)],
}
CTRL_C_AT = ["start-up", "mid-step", "first checkpoint", "final write"]


@pytest.mark.parametrize("moment", CTRL_C_AT)
@pytest.mark.parametrize("launcher, target", [("python", "group"), ("mpirun", "process"),
                                              ("mpirun", "group")])
def test_ctrl_c_at_every_moment_resumes_to_the_same_result(launcher, target, moment,
                                                           uninterrupted, mnist_h5, tmp_path):
    """Ctrl-C (SIGINT) to the process, to mpirun (which forwards it to every rank) or to
    their process group, as a terminal sends it: exit 130 with a checkpoint, from which
    --resume (on the other rank count) reaches the uninterrupted result; after the last
    step, the finished run."""
    out = tmp_path / "run"
    check_outcome(*run_trial(launcher, moment, signal.SIGINT, out, mnist_h5, target), out, moment,
                  signal.SIGINT, uninterrupted)
    if moment in HELD:
        resumed = launch_train(["--data", mnist_h5, "--out", out, *ARGS, "--resume"],
                               ranks=2 if launcher == "python" else None)
        assert resumed.returncode == 0, resumed.stderr
        assert run_result(out) == uninterrupted


@pytest.mark.parametrize("launcher, target", [("python", "process"), ("mpirun", "ranks")])
def test_a_hangup_stops_with_a_checkpoint_and_resumes(launcher, target, uninterrupted, mnist_h5,
                                                      tmp_path):
    """SIGHUP (a closed terminal or ssh session; under mpirun, sent to the ranks, as
    ``scancel --signal=HUP`` does): exit 129 with a checkpoint, resumed to the same result."""
    out = tmp_path / "run"
    check_outcome(*run_trial(launcher, "mid-step", signal.SIGHUP, out, mnist_h5, target), out,
                  "mid-step", signal.SIGHUP, uninterrupted)
    resumed = launch_train(["--data", mnist_h5, "--out", out, *ARGS, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert run_result(out) == uninterrupted


def test_a_hangup_ignored_at_start_stays_ignored(mnist_h5, tmp_path):
    """Under nohup (SIGHUP ignored) a closed terminal must not stop the run, although
    MPI_Init puts a SIGHUP handler of its own in place."""
    out = tmp_path / "run"
    job, _ = start("python", out, mnist_h5, [*ARGS, "--epochs", "10"], ignored=[signal.SIGHUP])
    wait_for(lambda: (out / ".lock").exists(), 60, "the run to claim its folder (after MPI_Init)",
             0.001)
    pids = rank_pids(out)
    with frozen(pids):
        assert has_signal(pids[0], "SigIgn", signal.SIGHUP), "SIGHUP is no longer ignored"
        job.send_signal(signal.SIGHUP)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    assert (out / "summary.json").exists()


@pytest.mark.parametrize("launcher", ["python", "mpirun"])
def test_a_second_ctrl_c_ends_at_once(launcher, uninterrupted, mnist_h5, tmp_path):
    """A Ctrl-C while a stop is pending ends the process at once: one line, exit 130, no
    traceback; under mpirun the job with it (a second Ctrl-C to mpirun itself makes it kill
    the ranks). The first Ctrl-C comes in start-up, step 1 still to come; the second reaches
    rank 0 once it said it holds the first. Should the stop be done by then (no time for
    the test to act on a loaded machine), the trial is taken again."""
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        ended = ctrl_c_twice(launcher, out, mnist_h5)
        if ended:
            break
    else:
        pytest.fail("every trial's stop was done before its second Ctrl-C came")
    code, err, took = ended
    assert code == 130, err
    assert err.count("ended at once") == 1 and "stopped after step" not in err, err
    assert "Traceback" not in err and took < 10, (took, err)
    resumed = launch_train(["--data", mnist_h5, "--out", out, *ARGS, "--resume"])
    assert resumed.returncode == 0, resumed.stderr  # what was left behind is cleaned up
    assert run_result(out) == uninterrupted


def ctrl_c_twice(launcher, out, data):
    """One trial of the test above: (exit code, stderr, seconds from the second Ctrl-C to
    the end), or None if the stop was done before the second Ctrl-C could come."""
    job, _ = start(launcher, out, data, LONG, stdout=subprocess.DEVNULL)
    stderr = Lines(job.stderr)
    try:
        wait_for(lambda: (out / ".lock").exists(), 60, "the run to claim its folder", 0.001)
        TARGETS["group" if launcher == "python" else "process"](job, out, signal.SIGINT)
        wait_for(lambda: "Ctrl-C again ends at once" in stderr.text(), 60,
                 "rank 0 to say what a Ctrl-C does", 0.001)
        rank0 = rank_pid(rank_pids(out), 0)
        with frozen([rank0]):
            if checkpoint.listing(out / "checkpoints"):
                return None  # stopped with its checkpoint before the second Ctrl-C came
            if launcher == "python":
                TARGETS["group"](job, out, signal.SIGINT)
            else:
                os.kill(rank0, signal.SIGINT)  # not through mpirun, which would kill the ranks
            wait_for(lambda: has_signal(rank0, "ShdPnd", signal.SIGINT)
                     or has_signal(rank0, "SigPnd", signal.SIGINT), 60, "the second Ctrl-C")
        let_go = time.monotonic()
        job.wait(timeout=60)
        took = time.monotonic() - let_go
    finally:
        if job.poll() is None:
            job.kill()
        job.wait()
    stderr.reader.join(timeout=60)
    return job.returncode, stderr.text(), took


class Lines:
    """What a stream gave so far, read by a thread: to wait for a line while a job runs."""

    def __init__(self, stream):
        self.lines = []
        self.reader = threading.Thread(target=self.read, args=(stream,), daemon=True)
        self.reader.start()

    def read(self, stream):
        for line in stream:
            self.lines.append(line)

    def text(self):
        return "".join(self.lines)


def rank_pid(pids, rank):
    """Which of a run's rank ``pids`` is rank ``rank`` (the only one of a run alone)."""
    if len(pids) == 1:
        return pids[0]
    return next(p for p in pids if f"PMI_RANK={rank}".encode()
                in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"))


@pytest.mark.parametrize("launcher, signum, target", [
    ("python", signal.SIGTERM, "process"), ("python", signal.SIGINT, "group"),
    ("mpirun", signal.SIGTERM, "rank 1"), ("mpirun", signal.SIGINT, "rank 1")],
    ids=["python-SIGTERM", "python-SIGINT", "mpirun-SIGTERM-rank1", "mpirun-SIGINT-rank1"])
def test_a_stop_signal_ends_an_open_that_blocks(launcher, signum, target, mnist_h5, tmp_path):
    """--data made a FIFO after the trainer checked it (tests/helpers/fifo_after_check.py):
    every rank blocks in open(). A stop signal ends that wait with one line and its exit
    code, nothing written; sent to one rank alone, that rank ends the whole job."""
    data, out = tmp_path / "data.h5", tmp_path / "run"
    os.link(mnist_h5, data)
    helper = str(ROOT / "tests" / "helpers" / "fifo_after_check.py")
    job, _ = start(launcher, out, data, ARGS, program=(helper,))
    try:
        pids = wait_for(lambda: blocked_in_fifo_open(out, RANKS[launcher]), 60,
                        "every rank to block opening its FIFO", 0.001)
        if target.startswith("rank"):
            os.kill(rank_pid(pids, int(target.split()[1])), signum)
        else:
            TARGETS[target](job, out, signum)
        _, err = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            job.kill()
            job.communicate()
    assert job.returncode == EXIT_CODES[signum], err
    where = "rank 1: " if launcher == "mpirun" else ""
    rank = 1 if launcher == "mpirun" else 0
    assert [line for line in err.splitlines() if line.startswith("distnn.train")] == [
        (f"distnn.train: stopped: {where}{signum.name} received while opening --data "
         f"{data}.rank{rank}; stopped before training, nothing was written")], err
    assert "Traceback" not in err and not out.exists(), err


def blocked_in_fifo_open(out, ranks):
    """The ``ranks`` rank PIDs of the run on ``out`` once each waits in open() for a FIFO's
    writer (the kernel's wait_for_partner), else None."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            waits = (entry / "wchan").read_text() == "wait_for_partner"
        except OSError:
            continue
        if Path(argv[0].decode()).name.startswith("python") and str(out).encode() in argv:
            pids.append((int(entry.name), waits))
    return [pid for pid, _ in pids] if len(pids) == ranks and all(w for _, w in pids) else None


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
