"""``python -m distnn.train``: synchronous data-parallel SGD, bit-identical for any rank count.

The training loop: set up (data, parameters or a checkpoint, output folder),
then per epoch one exact step per global mini-batch (:mod:`distnn.step`) at
the schedule's rate (:mod:`distnn.schedule`), an evaluation, and rank 0's log
line, metrics record and checkpoint.
"""

if __name__ == "__main__":
    # python -m distnn.train: catch SIGTERM/SIGUSR1 from the first line on, before the
    # slow imports below (numpy, h5py, MPI_Init), so a stop signal never kills a rank
    from distnn.stop import REQUEST as _STOP
    _STOP.install()

import json
import os
import signal
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from distnn import checkpoint, config, numerics, optim, outputs, parallel, rundir, startup
from distnn.data import Dataset
from distnn.errors import Diverged, OutputError, Stopped, UserError
from distnn.exact import ExactGradients, ExactSum, NonFiniteError
from distnn.progress import Progress
from distnn.schedule import Schedule
from distnn.step import N_EVAL_STATS, N_STATS, BatchColumns, evaluate, local_share, train_step
from distnn.stop import REQUEST

PROG = startup.PROG


def epoch_record(state, cfg, data, comm, eval_reducer, timers, seconds, trained, rate):
    """The metrics record of the epoch in progress: running training sums plus evaluation.

    ``trained`` samples took ``seconds`` in this process (less than the epoch's
    samples when it resumed from a checkpoint inside the epoch); ``rate`` is the
    learning rate of the epoch's last step.
    """
    seen, totals = state.seen, state.totals
    return {"epoch": state.epoch, "step": state.step, "ranks": comm.size, "lr": rate,
            "train_loss": totals[0] / seen, "train_acc": totals[1] / seen,
            "samples_per_s": trained / seconds if seconds else None,
            **{f"{k}_s": round(v, 4) for k, v in timers.items()},
            **evaluation(state.step, state.params, cfg, data, comm, eval_reducer)}


def initial_record(params, cfg, data, comm, eval_reducer):
    """Epoch 0: the metrics of the parameters before any step (the baseline)."""
    return {"epoch": 0, "step": 0, "ranks": comm.size, "elapsed_s": 0.0,
            **evaluation(0, params, cfg, data, comm, eval_reducer)}


def evaluation(step, params, cfg, data, comm, eval_reducer):
    """Accuracy, quadratic cost and cross-entropy on the validation and test splits."""
    record = {}
    for split in ("val", "test"):
        try:
            scores = evaluate(params, cfg, data, split, comm, eval_reducer) or {}
        except NonFiniteError:
            raise Diverged(f"training diverged by step {step}: the {split} outputs became "
                           "NaN or infinite; the last good checkpoint is kept; lower --lr",
                           agreed=True) from None
        for key, value in scores.items():
            record[f"{split}_{key}"] = value
    return record


def check_finite(state):
    """Raise Diverged if any parameter is NaN or infinite (never checkpoint those)."""
    if not all(np.isfinite(W).all() and np.isfinite(b).all() for W, b in state.params):
        raise Diverged(f"training diverged by step {state.step}: the parameters became NaN or "
                       "infinite; the last good checkpoint is kept; lower --lr", agreed=True)


def log_line(record, cfg):
    evals = "".join(f"  {k} {record[k]:.4f}" for k in ("val_acc", "test_acc") if k in record)
    head = f"epoch {record['epoch']:3d}/{cfg.epochs}  step {record['step']:6d}  "
    if record["epoch"] == 0:
        return head + f"initial parameters{evals}"
    return (head + f"loss {record['train_loss']:.4f}  train_acc {record['train_acc']:.4f}{evals}  "
            f"{record['samples_per_s']:.0f} samples/s")


def on_rank0(comm, fn, *args):
    """``fn(*args)`` on rank 0 (its writes), agreed: when it fails (an OutputError for a
    file that cannot be written), every rank ends with its error. Returns rank 0's result."""
    return comm.bcast(parallel.agree(comm, lambda: fn(*args) if comm.rank == 0 else None), root=0)


def run(cfg, comm=MPI.COMM_SELF, stop=None):
    """Train with ``cfg`` on ``comm``; return (params, summary). Rank 0 claims and writes
    ``cfg.out`` (a new ``runs/<timestamp>`` when empty) and, unless ``cfg.quiet``, prints
    the configuration, progress and one line per epoch.

    ``stop`` (a :class:`distnn.stop.StopRequest`) makes every rank stop after
    the step in which any rank received SIGTERM or SIGUSR1.
    """
    numerics.check(comm)  # every rank computes the reference bits, or none starts
    parallel.agree(comm, startup.prepare_default_data, cfg, comm)
    data = parallel.agree(comm, Dataset, cfg.data, cfg.train_limit, cfg.val_size, cfg.seed, cfg.stream)
    try:
        startup.check_same_settings(comm, cfg, data.fingerprint)
        if comm.rank == 0:
            startup.note_train_limit(cfg, data)
        params = parallel.agree(comm, startup.initial_params, cfg)
        folder = parallel.agree(comm, lambda: rundir.claim(cfg.out, cfg.resume) if comm.rank == 0
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
    """The run itself, in the claimed ``folder`` (rank 0's; None on the others)."""
    try:
        resumed = parallel.agree(comm, startup.resume_state, cfg, data.fingerprint, comm)
        state = startup.share_state(comm, resumed, params,
                                    optim.zero_velocity(params, cfg.momentum))
        eval_reducer = ExactSum([N_EVAL_STATS], comm)
        if not state.history:  # a fresh run: the baseline, epoch 0
            state.history.append(initial_record(state.params, cfg, data, comm, eval_reducer))
        out, config_json = Path(cfg.out), cfg.to_json()
        metrics_log = outputs.MetricsLog(out / "metrics.jsonl")
        on_rank0(comm, lambda: (metrics_log.rewrite(state.history),
                                outputs.write_json(out / "config.json", json.loads(config_json))))
    except BaseException:
        if folder:
            folder.discard()  # failed before its first step: leave no trace of a new folder
        raise
    try:
        return train_steps(cfg, comm, data, state, metrics_log, config_json, eval_reducer, stop)
    except OutputError as exc:
        raise OutputError(f"{exc}; the checkpoints written so far are intact: continue with "
                          f"--resume --out {cfg.out} once it can be written",
                          agreed=exc.agreed) from None


def train_steps(cfg, comm, data, state, metrics_log, config_json, eval_reducer, stop):
    """Epochs of exact steps from ``state`` on; rank 0 logs, records and checkpoints."""
    size, rank = comm.size, comm.rank
    out = Path(cfg.out)
    steps_per_epoch = -(-data.size("train") // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    progress = Progress(total_steps, cfg.log_every, cfg.quiet, enabled=rank == 0, start=state.step)
    if rank == 0 and not cfg.quiet:
        print(f"{PROG}: {size} rank{'s' if size > 1 else ''}, {data.size('train')} training / "
              f"{data.size('val')} validation / {data.size('test')} test images\n"
              f"{cfg.describe()}", flush=True)
        if state.step == 0:
            progress.write(log_line(state.history[0], cfg))

    def elapsed():
        """Seconds of training so far, counting the sessions before a resumption."""
        return round(resumed_at + time.perf_counter() - start, 3)

    def save_checkpoint():
        """Rank 0 writes ``state`` (agreed); every rank first checks the parameters are finite."""
        check_finite(state)
        state.elapsed_s = elapsed()
        return on_rank0(comm, checkpoint.save, out / "checkpoints", state, config_json,
                        data.fingerprint, cfg.keep)

    reducer = ExactGradients(cfg.layers, N_STATS, comm, dtype=cfg.np_dtype)
    batch_columns = BatchColumns(cfg.layers[0], comm)
    record = state.history[-1]
    rates = Schedule.of(cfg, steps_per_epoch)
    rate = rates.rate(max(state.step - 1, 0))
    resumed_at, trained, train_seconds, start = state.elapsed_s, 0, 0.0, time.perf_counter()
    while state.epoch <= cfg.epochs and not (cfg.max_steps and state.step >= cfg.max_steps):
        order = data.epoch_order(state.epoch, cfg.seed, cfg.shuffle)
        timers, epoch_start, seen_before = dict(compute=0.0, comm=0.0, data=0.0), time.perf_counter(), state.seen
        while state.position < steps_per_epoch and not (cfg.max_steps and state.step >= cfg.max_steps):
            t0 = time.perf_counter()
            batch = order[state.position * cfg.batch_size:(state.position + 1) * cfg.batch_size]
            pixels, T = local_share(data, batch, cfg, comm)
            columns = batch_columns(data, batch, pixels)
            rate = rates.rate(state.step)
            t1 = time.perf_counter()
            try:
                new_params, stats = train_step(state.params, state.velocity, rate, cfg, pixels, T,
                                               columns, reducer, len(batch),
                                               stop.signum if stop else 0)
            except NonFiniteError:
                raise Diverged(f"training diverged at epoch {state.epoch}, step {state.step + 1}: "
                               f"the loss or gradients became NaN or infinite; the last good "
                               f"checkpoint is kept; lower --lr (now {cfg.lr})", agreed=True) from None
            t2 = time.perf_counter()
            timers["data"] += t1 - t0
            timers["compute"] += (t2 - t1) - reducer.comm_seconds
            timers["comm"] += reducer.comm_seconds
            state.params, state.totals = new_params, state.totals + stats
            state.seen, state.step, state.position = state.seen + len(batch), state.step + 1, state.position + 1
            progress.update(state.step, state.epoch, stats[0] / len(batch), len(batch))
            signum = reducer.carried  # the stop signal of any rank, agreed in the step
            if signum:
                path = save_checkpoint()
                raise Stopped(f"{signal.Signals(signum).name} received: stopped after step "
                              f"{state.step}, checkpoint {path}; continue with --resume "
                              f"--out {cfg.out}", agreed=True)
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
                    and state.position < steps_per_epoch):
                save_checkpoint()
        seconds = time.perf_counter() - epoch_start
        trained, train_seconds = trained + state.seen - seen_before, train_seconds + seconds
        if state.seen == 0:
            break
        finished = state.position == steps_per_epoch
        check_finite(state)
        if not finished:
            save_checkpoint()  # stopped by --max-steps inside an epoch: resumable from here
        parallel.check_replicas(comm, state.params + state.velocity, f"after step {state.step}")
        record = epoch_record(state, cfg, data, comm, eval_reducer, timers, seconds,
                              state.seen - seen_before, rate)
        record["elapsed_s"] = elapsed()
        on_rank0(comm, metrics_log.append, record)
        if rank == 0 and not cfg.quiet:
            progress.write(log_line(record, cfg))
        if not finished:
            break
        state.history.append(record)
        state.epoch, state.position, state.seen, state.totals = state.epoch + 1, 0, 0, np.zeros(N_STATS)
        save_checkpoint()
    progress.close()
    check_finite(state)
    if trained == 0 and state.seen:
        # resumed at a --max-steps stop inside an epoch with nothing left to do:
        # that epoch's record (the same numbers as before) closes the run again
        record = epoch_record(state, cfg, data, comm, eval_reducer,
                              dict(compute=0.0, comm=0.0, data=0.0), 0.0, 0, rate)
        record["elapsed_s"] = state.elapsed_s
        on_rank0(comm, metrics_log.append, record)
    summary = {"world_size": size, "steps": state.step, "epochs": record["epoch"],
               "params_sha256": parallel.params_digest(state.params),
               "train_loss": record["train_loss"], "val_acc": record.get("val_acc"),
               "test_acc": record.get("test_acc"),
               "samples_per_s": trained / train_seconds if trained else record.get("samples_per_s"),
               "wall_s": time.perf_counter() - start}
    on_rank0(comm, lambda: (outputs.save_model(out / "model.h5", state.params, cfg.layers,
                                               cfg.activation, cfg.loss, cfg.positive_digit),
                            outputs.write_json(out / "summary.json", summary)))
    return state.params, summary


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
    stop = REQUEST.install()  # again: MPI_Init may have put MPICH's own SIGUSR1 handler first
    threadpool_limits(limits=1, user_api="blas")
    np.seterr(all="ignore")  # NaN and infinity are detected and reported as divergence
    comm = MPI.COMM_WORLD

    def go():
        cfg = parse(argv, comm)
        _, summary = run(cfg, comm, stop=stop)
        if comm.rank == 0:
            acc = "" if summary["test_acc"] is None else f"test_acc {summary['test_acc']:.4f}  "
            print(f"{PROG}: done: {acc}params_sha256 {summary['params_sha256']}  -> {cfg.out}",
                  flush=True)

    parallel.finish(comm, PROG, parallel.run_or_abort(comm, PROG, go), stop)


if __name__ == "__main__":
    main()
