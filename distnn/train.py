"""``python -m distnn.train``: synchronous data-parallel SGD, bit-identical for any rank count.

The training loop: set up (data, parameters or a checkpoint, output folder),
then per epoch one exact step per global mini-batch (:mod:`distnn.step`) at
the schedule's rate (:mod:`distnn.schedule`), an evaluation, and rank 0's log
line, metrics record and checkpoint.
"""

if __name__ == "__main__":
    # python -m distnn.train: catch the stop signals (SIGTERM, SIGUSR1, SIGINT, SIGHUP) from
    # the first line on, before the slow imports below (numpy, h5py, MPI_Init), so a stop
    # signal never kills a rank nor raises KeyboardInterrupt in one
    from distnn.stop import REQUEST as _STOP
    _STOP.install()

import os
import signal
import time
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from distnn import (
    compiled,
    config,
    memory,
    model,
    numerics,
    optim,
    parallel,
    rundir,
    startup,
)
from distnn.data import Dataset
from distnn.errors import TRAIN, Diverged, OutputError, UserError, stopped
from distnn.evaluate import N_EVAL_STATS, evaluation
from distnn.exact import ExactSum, NonFiniteError
from distnn.progress import Progress
from distnn.rundir import claim
from distnn.schedule import Schedule
from distnn.step import Stepper
from distnn.stop import REQUEST
from distnn.timing import PHASES


def run(cfg, comm=MPI.COMM_SELF, stop=None):
    """Train with ``cfg`` on ``comm``; return (params, summary). Rank 0 claims and writes
    ``cfg.out`` (a new ``runs/<timestamp>`` when empty) and, unless ``cfg.quiet``, prints
    the configuration, progress and one line per epoch.

    ``stop`` (a :class:`distnn.stop.StopRequest`) makes every rank stop after
    the step in which any rank received a stop signal (SIGTERM, SIGUSR1, SIGINT, SIGHUP).
    """
    numerics.check(comm)  # every rank computes the reference bits, or none starts
    parallel.agree(comm, startup.prepare_default_data, cfg, comm)
    parallel.agree(comm, memory.check, cfg, comm)  # before the data and parameters are allocated
    data = parallel.agree(comm, Dataset, cfg.data, cfg.train_limit, cfg.val_size, cfg.seed, cfg.stream)
    try:
        parallel.check_same_settings(comm, cfg, data.fingerprint)
        if comm.rank == 0:
            startup.note_train_limit(cfg, data)
        params = parallel.agree(comm, startup.initial_params, cfg)
        folder = parallel.agree(comm, lambda: claim.claim(cfg.out, cfg.resume) if comm.rank == 0
                                else None)
        cfg.out = comm.bcast(str(folder.path) if folder else None, root=0)
        try:
            return train(cfg, comm, data, params, folder, stop)
        finally:
            if folder:
                folder.release()
    finally:
        data.close()


def train(cfg, comm, data, params, folder, stop):
    """The run itself, in the claimed ``folder`` (rank 0's; None on the others): the
    state to start from on every rank, the loop, and the trained model."""
    try:
        resumed = parallel.agree(comm, lambda: rundir.resume_state(cfg, data)
                                 if comm.rank == 0 else None)
        state = parallel.share_state(comm, resumed, params, optim.zero_velocity(params, cfg.momentum))
        scorer = ExactSum([N_EVAL_STATS], comm)
        if not state.history:  # a fresh run: the baseline, epoch 0
            state.history.append({"epoch": 0, "step": 0, "ranks": comm.size, "elapsed_s": 0.0,
                                  **evaluation(0, state.params, cfg, data, comm, scorer)})
        files = rundir.RunFiles(cfg.out, cfg.to_json(), data.fingerprint, cfg.keep)
        parallel.on_rank0(comm, files.start, state.history)
    except BaseException:
        if folder:
            folder.discard()  # failed before its first step: leave no trace of a new folder
        raise
    try:
        record, samples_per_s, clock = train_steps(cfg, comm, data, state, files, scorer, stop)
        summary = {"world_size": comm.size, "steps": state.step, "epochs": record["epoch"],
                   "params_sha256": model.params_digest(state.params),
                   "train_loss": record["train_loss"], "val_acc": record.get("val_acc"),
                   "test_acc": record.get("test_acc"),
                   "samples_per_s": samples_per_s or record.get("samples_per_s"),
                   "wall_s": clock.session()}
        parallel.on_rank0(comm, files.finish, state.params, cfg, summary)
    except OutputError as exc:
        raise OutputError(f"{exc}; the checkpoints written so far are intact: continue with "
                          f"--resume --out {cfg.out} once it can be written",
                          agreed=exc.agreed) from None
    return state.params, summary


def train_steps(cfg, comm, data, state, files, scorer, stop):
    """The training loop: epochs of exact steps from ``state`` on, each epoch closed by an
    evaluation; rank 0 logs, records and checkpoints. Returns the last metrics record,
    this session's samples/s (None if it trained none) and its clock."""
    steps_per_epoch = -(-data.size("train") // cfg.batch_size)
    rates = Schedule.of(cfg, steps_per_epoch)
    step, clock = Stepper(cfg, comm), Clock(state.elapsed_s)
    progress = begin(cfg, comm, data, state, steps_per_epoch)
    record, rate = state.history[-1], rates.rate(max(state.step - 1, 0))
    trained, train_seconds = 0, 0.0
    while state.epoch <= cfg.epochs and not at_max_steps(cfg, state):
        order = data.epoch_order(state.epoch, cfg.seed, cfg.shuffle)
        step.timer.reset()
        epoch_start, seen_before = time.perf_counter(), state.seen
        while state.position < steps_per_epoch and not at_max_steps(cfg, state):
            batch = order[state.position * cfg.batch_size:(state.position + 1) * cfg.batch_size]
            rate = rates.rate(state.step)
            stats, signum = exact_step(step, state, rate, cfg, data, batch, stop)
            state.advance(len(batch), stats)
            progress.update(state.step, state.epoch, stats[0] / len(batch), len(batch))
            if signum:
                stop_now(cfg, comm, state, files, clock, signum)
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
                    and state.position < steps_per_epoch):
                save_checkpoint(comm, state, files, clock)
        seconds = time.perf_counter() - epoch_start
        trained, train_seconds = trained + state.seen - seen_before, train_seconds + seconds
        finished = state.position == steps_per_epoch
        record = epoch_record(state, comm, rate, step.timer, seconds, state.seen - seen_before)
        end_epoch(cfg, comm, data, state, files, scorer, clock, progress, record, finished)
        if not finished:
            break  # --max-steps ended the run inside this epoch
        state.next_epoch(record)
        save_checkpoint(comm, state, files, clock)
    progress.close()
    check_finite(state)
    if trained == 0 and state.seen:
        # resumed at a --max-steps stop inside an epoch with nothing left to do:
        # that epoch's record (the same numbers as before) closes the run again
        record = {**epoch_record(state, comm, rate, None, 0.0, 0), "elapsed_s": state.elapsed_s,
                  **evaluation(state.step, state.params, cfg, data, comm, scorer)}
        parallel.on_rank0(comm, files.metrics.append, record)
    return record, (trained / train_seconds if trained else None), clock


def exact_step(step, state, rate, cfg, data, batch, stop):
    """One exact step on ``state``'s parameters and velocity (in place); returns the
    batch's stat sums and the stop signal any rank received (0: none). Diverged, on
    every rank, when a loss or gradient is NaN or infinite."""
    try:
        return step(state.params, state.velocity, rate, data, batch, stop.signum if stop else 0)
    except NonFiniteError:
        raise Diverged(f"training diverged at epoch {state.epoch}, step {state.step + 1}: "
                       f"the loss or gradients became NaN or infinite; the last good "
                       f"checkpoint is kept; lower --lr (now {cfg.lr})", agreed=True) from None


def end_epoch(cfg, comm, data, state, files, scorer, clock, progress, record, finished):
    """Check the replicas, evaluate and record the epoch in progress (``record``, completed
    here); an epoch cut short by --max-steps is checkpointed first, so it can continue."""
    if not finished:
        save_checkpoint(comm, state, files, clock)
    else:
        check_finite(state)
    parallel.check_replicas(comm, state.params + state.velocity, f"after step {state.step}")
    record.update(evaluation(state.step, state.params, cfg, data, comm, scorer),
                  elapsed_s=clock.elapsed())
    parallel.on_rank0(comm, files.metrics.append, record)
    if comm.rank == 0 and not cfg.quiet:
        progress.write(log_line(record, cfg))


def epoch_record(state, comm, rate, timer, seconds, trained):
    """The metrics record of the epoch in progress, before its evaluation: running
    training sums, the rate of its last step, and where this session's time went.

    ``trained`` samples took ``seconds`` in this process (fewer than the epoch's when
    it resumed inside the epoch); ``timer`` holds their steps' phases (None: no step).
    """
    phases = timer.seconds if timer else dict.fromkeys(PHASES, 0.0)
    return {"epoch": state.epoch, "step": state.step, "ranks": comm.size, "lr": rate,
            "train_loss": state.totals[0] / state.seen, "train_acc": state.totals[1] / state.seen,
            "samples_per_s": trained / seconds if seconds else None,
            **{f"{k}_s": round(v, 4) for k, v in phases.items()}}


def begin(cfg, comm, data, state, steps_per_epoch):
    """Rank 0's opening lines (the ranks, the data, the settings; a fresh run's epoch 0)
    and the progress bar."""
    total = cfg.epochs * steps_per_epoch
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    progress = Progress(total, cfg.log_every, cfg.quiet, enabled=comm.rank == 0, start=state.step,
                        mode=cfg.progress)
    if comm.rank == 0 and not cfg.quiet:
        print(f"{TRAIN}: {comm.size} rank{'s' if comm.size > 1 else ''}, {data.size('train')} "
              f"training / {data.size('val')} validation / {data.size('test')} test images, "
              f"{compiled.ACTIVE} kernels\n"
              f"{cfg.describe()}", flush=True)
        if state.step == 0:
            progress.write(log_line(state.history[0], cfg))
    return progress


def at_max_steps(cfg, state):
    return bool(cfg.max_steps) and state.step >= cfg.max_steps


class Clock:
    """Seconds of training: this session's, and all sessions' (``elapsed``, counting those
    before a --resume)."""

    def __init__(self, before):
        self.before, self.start = before, time.perf_counter()

    def session(self):
        return time.perf_counter() - self.start

    def elapsed(self):
        return round(self.before + self.session(), 3)


def save_checkpoint(comm, state, files, clock):
    """Rank 0 writes ``state`` (agreed) once every rank found its parameters finite;
    returns the checkpoint's path."""
    check_finite(state)
    state.elapsed_s = clock.elapsed()
    return parallel.on_rank0(comm, files.save_checkpoint, state)


def stop_now(cfg, comm, state, files, clock, signum):
    """A stop signal reached some rank: checkpoint, then end every rank with the Stopped
    of that signal (its exit code)."""
    path = save_checkpoint(comm, state, files, clock)
    raise stopped(signum, f"{signal.Signals(signum).name} received: stopped after step "
                          f"{state.step}, checkpoint {path}; continue with --resume --out {cfg.out}",
                  agreed=True)


def check_finite(state):
    """Raise Diverged if any parameter is NaN or infinite (never checkpoint those)."""
    if not all(np.isfinite(W).all() and np.isfinite(b).all() for W, b in state.params):
        raise Diverged(f"training diverged by step {state.step}: the parameters became NaN or "
                       "infinite; the last good checkpoint is kept; lower --lr", agreed=True)


def log_line(record, cfg):
    """One epoch's line: loss and accuracies (epoch 0: the initial parameters')."""
    evals = "".join(f"  {k} {record[k]:.4f}" for k in ("val_acc", "test_acc") if k in record)
    head = f"epoch {record['epoch']:3d}/{cfg.epochs}  step {record['step']:6d}  "
    if record["epoch"] == 0:
        return head + f"initial parameters{evals}"
    return (head + f"loss {record['train_loss']:.4f}  train_acc {record['train_acc']:.4f}{evals}  "
            f"{record['samples_per_s']:.0f} samples/s")


def parse(argv, comm):
    """Parse flags on every rank; any rank's mistake ends every rank with one line.

    Only rank 0 prints --help. Ranks launched with different flags (e.g. an
    MPMD ``mpirun ... : ...``) agree on the outcome instead of hanging.
    """
    parser = config.build_parser()
    try:
        if comm.rank == 0:
            args = parser.parse_args(argv)
        else:
            with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
                args = parser.parse_args(argv)
        outcome = config.from_args(args)
    except UserError as exc:
        outcome = str(exc)
    except SystemExit as exc:  # --help
        outcome = exc.code or 0
    outcomes = comm.allgather(outcome if not isinstance(outcome, config.Config) else None)
    parallel.raise_agreed([("UserError", o) if isinstance(o, str) else None for o in outcomes])
    if any(isinstance(o, int) for o in outcomes):
        raise SystemExit(0)
    return outcome


def main(argv=None):
    stop = REQUEST.install()  # again: MPI_Init put MPICH's own SIGUSR1 and SIGHUP handlers first
    threadpool_limits(limits=1, user_api="blas")
    np.seterr(all="ignore")  # NaN and infinity are detected and reported as divergence
    comm = MPI.COMM_WORLD
    stop.announce = comm.rank == 0

    def go():
        cfg = parse(argv, comm)
        _, summary = run(cfg, comm, stop=stop)
        if comm.rank == 0:
            acc = "" if summary["test_acc"] is None else f"test_acc {summary['test_acc']:.4f}  "
            print(f"{TRAIN}: done: {acc}params_sha256 {summary['params_sha256']}  -> {cfg.out}",
                  flush=True)

    parallel.finish(comm, TRAIN, parallel.run_or_abort(comm, TRAIN, go), stop)


if __name__ == "__main__":
    main()
