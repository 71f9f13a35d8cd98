"""``python -m distnn.train``: synchronous data-parallel SGD, bit-identical for any rank count.

Each global mini-batch is cut into blocks of ``--block-size`` rows (the last one
padded and masked). Each rank takes a contiguous run of blocks, runs forward
and backward block by block, and the per-block gradients are summed exactly
(:mod:`distnn.exact`) with one Allreduce. Block bits do not depend on the rank
count and the exact sum does not depend on the order, so every rank count,
including a plain single process, produces the same parameters, bit for bit.
"""

import datetime
import os
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from distnn import comm as dcomm
from distnn import config as dconfig
from distnn import losses, model, outputs
from distnn.data import Dataset
from distnn.errors import UserError
from distnn.exact import ExactGradients, ExactSum, NonFiniteError

PROG = "distnn.train"
EVAL_BLOCK = 250  # rows per evaluation block: fixed, so metrics do not depend on P
N_STATS = 4       # per row: loss, correct, quadratic cost, cross-entropy


def block_range(n_blocks, size, rank):
    """The contiguous run of blocks [lo, hi) that ``rank`` of ``size`` works on."""
    base, extra = divmod(n_blocks, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def stack_blocks(images, labels, n_blocks, block_size, n_out):
    """Pad rows to n_blocks * block_size; return pixels (rows, 784), targets and mask.

    Padding rows are zero and masked out; ``rows = n_blocks * block_size``.
    """
    rows = n_blocks * block_size
    pixels = np.zeros((rows, images.shape[1]), np.float64)
    pixels[:len(images)] = images
    targets = np.zeros((rows, n_out))
    targets[np.arange(len(labels)), labels] = 1
    mask = np.zeros(rows)
    mask[:len(images)] = 1
    return pixels, targets, mask


def as_blocks(a, block_size):
    return a.reshape(-1, block_size, a.shape[-1])


def row_stats(cfg, z, y, T, mask):
    """Per-row loss, correct, quadratic cost and cross-entropy (zero on padding)."""
    stats = [losses.per_sample_loss(cfg.loss, z, y, T), *model.metric_sums(y, T)]
    return np.stack([s.astype(np.float64) for s in stats], axis=-1) * mask[..., None]


def train_step(params, cfg, pixels, T, mask, reducer, n_rows, total_rows):
    """One SGD step on this rank's rows (whole blocks); returns (params, global stat sums).

    ``n_rows`` is the global batch size, ``total_rows`` the same padded to whole blocks.

    Forward and backward run block by block (the bits of a block do not depend
    on the rank count); the gradients are summed exactly by ``reducer``.
    """
    dtype, bs = cfg.np_dtype, cfg.block_size
    X = as_blocks(pixels.astype(dtype) / dtype(255), bs)
    Tb, maskb = as_blocks(T.astype(dtype), bs), as_blocks(mask[:, None].astype(dtype), bs)
    inputs, zs, y = model.forward_pass(params, X, cfg.activation, cfg.loss)
    delta = losses.output_delta(cfg.loss, zs[-1], y, Tb) * maskb
    deltas = model.layer_deltas(params, inputs, zs, delta, cfg.activation)
    rows = len(pixels)
    flat_inputs = [pixels] + [a.reshape(rows, a.shape[-1]) for a in inputs[1:]]
    flat_deltas = [d.reshape(rows, d.shape[-1]) for d in deltas]
    stats = row_stats(cfg, zs[-1], y, Tb, maskb[..., 0]).reshape(rows, N_STATS)
    mean, stat_sums = reducer(flat_inputs, flat_deltas, stats, total_rows, divide_by=n_rows)
    return model.sgd_step(params, mean, cfg.lr), stat_sums


def evaluate(params, cfg, data, split, comm, reducer):
    """Accuracy, quadratic cost and cross-entropy on a split, scored across ranks."""
    n = data.size(split)
    if n == 0:
        return None
    n_blocks = -(-n // EVAL_BLOCK)
    lo, hi = block_range(n_blocks, comm.size, comm.rank)
    images, labels = data.get(split, np.arange(lo * EVAL_BLOCK, min(hi * EVAL_BLOCK, n)))
    pixels, T, mask = stack_blocks(images, labels, hi - lo, EVAL_BLOCK, cfg.layers[-1])
    X = as_blocks(pixels.astype(cfg.np_dtype) / cfg.np_dtype(255), EVAL_BLOCK)
    _, zs, y = model.forward_pass(params, X, cfg.activation, cfg.loss)
    stats = row_stats(cfg, zs[-1], y, as_blocks(T, EVAL_BLOCK),
                      as_blocks(mask[:, None], EVAL_BLOCK)[..., 0])
    correct, quad, cross = reducer([stats.reshape(len(pixels), N_STATS)],
                                   n_blocks * EVAL_BLOCK)[0][1:]
    return {"acc": correct / n, "quadratic_cost": quad / n, "cross_entropy": cross / n}


def prepare_out(cfg, comm):
    """Create the output folder on rank 0; refuse one that already holds a run."""
    if comm.rank != 0:
        return
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if (out / "summary.json").exists() or (out / "metrics.jsonl").exists():
        raise UserError(f"--out {out}: already holds a run; choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create: {exc.strerror or exc}") from None


def prepare_default_data(cfg, comm):
    """Prepare the bundled MNIST at the default path if it is missing (rank 0)."""
    if comm.rank != 0 or cfg.data != dconfig.DEFAULT_DATA or Path(cfg.data).exists():
        return
    from data_prep import PrepError
    from data_prep.__main__ import main as prepare
    print(f"{PROG}: {cfg.data} is missing; preparing it from the bundled MNIST", flush=True)
    if prepare(["--out", cfg.data]) != 0:
        raise UserError(f"{cfg.data}: could not prepare the bundled MNIST")


def initial_params(cfg):
    """Random init, or the parameters of ``--init`` (which must match ``--layers``)."""
    if not cfg.init:
        return model.init_params(cfg.layers, cfg.seed, cfg.activation, cfg.np_dtype)
    params, attrs = outputs.load_model(cfg.init, cfg.np_dtype)
    if attrs["layers"] != tuple(cfg.layers):
        raise UserError(f"--init {cfg.init}: its layers {','.join(map(str, attrs['layers']))} "
                        f"do not match --layers {','.join(map(str, cfg.layers))}")
    return params


def run(cfg, comm=MPI.COMM_SELF, log=print):
    """Train with ``cfg`` on ``comm``; return (params, summary). Rank 0 writes ``cfg.out``."""
    size, rank = comm.size, comm.rank
    full_blocks = -(-cfg.batch_size // cfg.block_size)
    if full_blocks < size:
        raise UserError(f"--batch-size {cfg.batch_size} with --block-size {cfg.block_size} gives "
                        f"{full_blocks} blocks per step for {size} ranks; lower --block-size "
                        f"to at most {cfg.batch_size // size} or raise --batch-size", agreed=True)
    dcomm.agree(comm, prepare_default_data, cfg, comm)
    data = dcomm.agree(comm, Dataset, cfg.data, cfg.train_limit, cfg.val_size, cfg.seed, cfg.stream)
    params = dcomm.broadcast_params(comm, dcomm.agree(comm, initial_params, cfg))
    dcomm.agree(comm, prepare_out, cfg, comm)
    out = Path(cfg.out)
    metrics_log = outputs.MetricsLog(out / "metrics.jsonl")
    if rank == 0:
        log(f"{PROG}: {size} rank{'s' if size > 1 else ''}, {data.size('train')} training / "
            f"{data.size('val')} validation / {data.size('test')} test images\n{cfg.describe()}")
    reducer = ExactGradients(cfg.layers, N_STATS, comm)
    eval_reducer = ExactSum([N_STATS], comm)
    n_train = data.size("train")
    steps_per_epoch = -(-n_train // cfg.batch_size)
    step, trained, train_seconds, start = 0, 0, 0.0, time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        order = data.epoch_order(epoch, cfg.seed, cfg.shuffle)
        totals = np.zeros(N_STATS)
        seen, timers, epoch_start = 0, {"compute": 0.0, "comm": 0.0, "data": 0.0}, time.perf_counter()
        for s in range(steps_per_epoch):
            if cfg.max_steps and step >= cfg.max_steps:
                break
            t0 = time.perf_counter()
            batch = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            n_blocks = -(-len(batch) // cfg.block_size)
            lo, hi = block_range(n_blocks, size, rank)
            images, labels = data.get("train", batch[lo * cfg.block_size:hi * cfg.block_size])
            pixels, T, mask = stack_blocks(images, labels, hi - lo, cfg.block_size, cfg.layers[-1])
            t1 = time.perf_counter()
            try:
                params, stats = train_step(params, cfg, pixels, T, mask, reducer, len(batch),
                                           n_blocks * cfg.block_size)
            except NonFiniteError:
                raise UserError(f"training diverged at epoch {epoch}, step {step + 1}: the loss or "
                                f"gradients became NaN or infinite; lower --lr (now {cfg.lr})",
                                agreed=True) from None
            t2 = time.perf_counter()
            timers["data"] += t1 - t0
            timers["compute"] += (t2 - t1) - reducer.comm_seconds
            timers["comm"] += reducer.comm_seconds
            totals += stats
            seen += len(batch)
            step += 1
        if seen == 0:
            break
        epochs_done = epoch
        epoch_seconds = time.perf_counter() - epoch_start
        train_seconds += epoch_seconds
        trained += seen
        digest = dcomm.check_replicas(comm, params, f"after epoch {epoch}")
        val = evaluate(params, cfg, data, "val", comm, eval_reducer)
        test = evaluate(params, cfg, data, "test", comm, eval_reducer)
        record = {"epoch": epoch, "step": step, "train_loss": totals[0] / seen,
                  "train_acc": totals[1] / seen, "train_quadratic_cost": totals[2] / seen,
                  "train_cross_entropy": totals[3] / seen,
                  "samples_per_s": seen / epoch_seconds,
                  **{f"{k}_s": round(v, 4) for k, v in timers.items()}}
        for name, result in (("val", val), ("test", test)):
            for key, value in (result or {}).items():
                record[f"{name}_{key}"] = value
        if rank == 0:
            metrics_log.append(record)
            log(f"epoch {epoch:3d}/{cfg.epochs}  step {step:6d}  loss {record['train_loss']:.4f}  "
                f"train_acc {record['train_acc']:.4f}  val_acc {(val or {}).get('acc', float('nan')):.4f}  "
                f"test_acc {test['acc']:.4f}  {record['samples_per_s']:.0f} samples/s")
        if cfg.max_steps and step >= cfg.max_steps:
            break
    data.close()
    summary = {"world_size": size, "steps": step, "epochs": epochs_done, "params_sha256": digest,
               "train_loss": record["train_loss"], "val_acc": record.get("val_acc"),
               "test_acc": record["test_acc"], "samples_per_s": trained / train_seconds,
               "wall_s": time.perf_counter() - start}
    if rank == 0:
        outputs.save_model(out / "model.h5", params, cfg.layers, cfg.activation, cfg.loss)
        outputs.write_json(out / "summary.json", summary)
    return params, summary


def parse(argv, comm):
    """Parse flags; only rank 0 prints usage or --help."""
    parser = dconfig.build_parser()
    if comm.rank == 0:
        args = parser.parse_args(argv)
    else:
        with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
            args = parser.parse_args(argv)
    cfg = dconfig.from_args(args)
    if not cfg.out:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.out = comm.bcast(str(Path("runs") / stamp) if comm.rank == 0 else None, root=0)
    return cfg


def main(argv=None):
    threadpool_limits(limits=1, user_api="blas")
    comm = MPI.COMM_WORLD

    def go():
        try:
            cfg = parse(argv, comm)
        except UserError as exc:
            raise UserError(str(exc), agreed=True) from None
        _, summary = run(cfg, comm)
        if comm.rank == 0:
            print(f"{PROG}: done: test_acc {summary['test_acc']:.4f}  params_sha256 "
                  f"{summary['params_sha256']}  -> {cfg.out}", flush=True)

    dcomm.run_or_abort(comm, PROG, go)


if __name__ == "__main__":
    main()
