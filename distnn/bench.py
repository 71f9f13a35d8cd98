"""``python -m distnn.bench``: throughput of exact training against a plain numpy loop.

Runs the trainer's own ``train_step`` on real MNIST rows for a fixed number of
steps and, on a single rank, the same network trained by a plain float loop
(``model.loss_and_grads`` + ``sgd_step``, no exactness) as the in-run
reference. Repetitions alternate between the two so both see the same machine
load; medians are reported. Under ``mpirun -n P`` it measures P ranks (the
plain loop is then skipped).
"""

import argparse
import json
import statistics
import time

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from distnn import model
from distnn.config import DEFAULT_DATA, Config
from distnn.data import Dataset
from distnn.exact import ExactGradients
from distnn.step import N_STATS, block_range, stack_blocks, train_step


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m distnn.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="prepared HDF5 file (default data/mnist.h5)")
    p.add_argument("--layers", default="784,256,10", help="layer widths (default 784,256,10)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    p.add_argument("--block-size", type=int, default=32, help="rows per block (default 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="precision")
    p.add_argument("--steps", type=int, default=40, help="steps per repetition (default 40)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions, after one warm-up (default 5)")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def batches(data, cfg, steps):
    """The first ``steps`` global batches of epoch 1, as (uint8 images, labels)."""
    order = data.epoch_order(1, cfg.seed, True)
    out = []
    for s in range(steps):
        rows = order[(s * cfg.batch_size) % (len(order) - cfg.batch_size):][:cfg.batch_size]
        out.append(data.get("train", rows))
    return out


def time_exact(cfg, comm, work):
    reducer = ExactGradients(cfg.layers, N_STATS, comm)
    params = model.init_params(cfg.layers, cfg.seed, cfg.activation, cfg.np_dtype)
    n_blocks = -(-cfg.batch_size // cfg.block_size)
    lo, hi = block_range(n_blocks, comm.size, comm.rank)
    local = [stack_blocks(images[lo * cfg.block_size:hi * cfg.block_size],
                          labels[lo * cfg.block_size:hi * cfg.block_size],
                          hi - lo, cfg.block_size, cfg.layers[-1]) for images, labels in work]
    comm.Barrier()
    start = time.perf_counter()
    for pixels, T, mask in local:
        params, _ = train_step(params, cfg, pixels, T, mask, reducer, cfg.batch_size,
                               n_blocks * cfg.block_size)
    comm.Barrier()
    return time.perf_counter() - start


def time_plain(cfg, work):
    params = model.init_params(cfg.layers, cfg.seed, cfg.activation, cfg.np_dtype)
    prepared = [(images.astype(cfg.np_dtype) / cfg.np_dtype(255), labels) for images, labels in work]
    start = time.perf_counter()
    for X, labels in prepared:
        _, grads = model.loss_and_grads(params, X, labels, cfg.activation, cfg.loss)
        params = model.sgd_step(params, grads, cfg.lr)
    return time.perf_counter() - start


def main(argv=None):
    threadpool_limits(limits=1, user_api="blas")
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    cfg = Config(data=args.data, layers=tuple(int(w) for w in args.layers.split(",")),
                 batch_size=args.batch_size, block_size=args.block_size, dtype=args.dtype)
    data = Dataset(cfg.data, val_size=0)
    work = batches(data, cfg, args.steps)
    exact, plain = [], []
    for rep in range(args.repeats + 1):
        t_exact = time_exact(cfg, comm, work)
        t_plain = time_plain(cfg, work) if comm.size == 1 else None
        if rep:  # the first repetition is the warm-up
            exact.append(cfg.batch_size * args.steps / t_exact)
            if t_plain:
                plain.append(cfg.batch_size * args.steps / t_plain)
    if comm.rank == 0:
        result = {"ranks": comm.size, "layers": list(cfg.layers), "batch_size": cfg.batch_size,
                  "block_size": cfg.block_size, "dtype": cfg.dtype, "steps": args.steps,
                  "repeats": args.repeats,
                  "exact_samples_per_s": statistics.median(exact),
                  "plain_samples_per_s": statistics.median(plain) if plain else None}
        line = (f"{comm.size} rank(s), {args.layers}, batch {cfg.batch_size}, block "
                f"{cfg.block_size}, {cfg.dtype}: exact {result['exact_samples_per_s']:.0f} samples/s")
        if plain:
            ratio = result["exact_samples_per_s"] / result["plain_samples_per_s"]
            line += f", plain numpy loop {result['plain_samples_per_s']:.0f} samples/s, ratio {ratio:.2f}"
        print(line + f" (median of {args.repeats})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
