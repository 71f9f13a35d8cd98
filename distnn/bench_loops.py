"""The timed loops :mod:`distnn.bench` compares, each run in this process.

The machine's GEMM rate; a plain numpy loop of the network (BLAS products,
numpy's functions and sums: its bits depend on the machine), the in-run
reference for the cost of fixed bits; and the trainer's own exact step
(:class:`distnn.step.Stepper`), on a real communicator or on a stand-in with
no network (:class:`NoNetwork`) to time one rank's local work at a rank count.
"""

import statistics
import time

import numpy as np
from mpi4py import MPI

from distnn import model, optim
from distnn.step import Stepper


def median_of(fn, repeats):
    """Median of ``repeats`` calls of ``fn`` (seconds) after one warm-up call."""
    fn()
    return statistics.median(fn() for _ in range(repeats))


def window_seconds(fn, repeats):
    """All window times of ``repeats`` calls of ``fn`` (each returns a list) after a warm-up."""
    fn()
    return [w for _ in range(repeats) for w in fn()]


def batch_rows(data, cfg, steps):
    """The training positions of the first ``steps`` batches of a shuffled epoch."""
    order = data.epoch_order(1, cfg.seed, True)
    return [order[(s * cfg.batch_size) % (len(order) - cfg.batch_size):][:cfg.batch_size]
            for s in range(steps)]


def gemm_rate(dtype, rows, fan_in, fan_out, repeats):
    """GFLOP/s of one (rows x fan_in) @ (fan_in x fan_out) product in ``dtype``."""
    rng = np.random.default_rng(0)
    a = rng.random((rows, fan_in)).astype(dtype)
    b = rng.random((fan_in, fan_out)).astype(dtype)

    def once():
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        return (time.perf_counter() - start) / 20
    return 2 * rows * fan_in * fan_out / median_of(once, repeats) / 1e9


def plain_gradients(params, X, T):
    """The mean gradient of the sigmoid/softmax network in ordinary numpy: BLAS products,
    numpy's tanh and exp and numpy's sums, in the parameters' dtype."""
    half = X.dtype.type(0.5)
    acts = [X]
    for W, b in params[:-1]:
        acts.append(half * (1 + np.tanh(half * (acts[-1] @ W + b))))
    z = acts[-1] @ params[-1][0] + params[-1][1]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    delta = (e / e.sum(axis=1, keepdims=True) - T) / X.dtype.type(len(X))
    grads = []
    for layer in range(len(params) - 1, -1, -1):
        grads.insert(0, (acts[layer].T @ delta, delta.sum(axis=0)))
        if layer:
            delta = (delta @ params[layer][0].T) * acts[layer] * (1 - acts[layer])
    return grads


def plain_step_loop(cfg, data, rows, window):
    """A timer for the plain numpy loop (one process); each call returns the seconds
    of every ``window`` steps."""
    batches = [data.get("train", r) for r in rows]

    def once():
        params = model.init_params(cfg.layers, cfg.seed, cfg.activation, cfg.np_dtype)
        velocity = optim.zero_velocity(params, cfg.momentum)
        windows, start = [], time.perf_counter()
        for i, (images, labels) in enumerate(batches):
            X = images.astype(cfg.np_dtype) / cfg.np_dtype(255)
            T = np.eye(cfg.layers[-1], dtype=cfg.np_dtype)[labels]
            optim.update(params, plain_gradients(params, X, T), velocity, cfg.lr, cfg.momentum,
                         cfg.nesterov, cfg.weight_decay)
            if (i + 1) % window == 0:
                windows.append(time.perf_counter() - start)
                start = time.perf_counter()
        return windows
    return once


def exact_step_loop(cfg, data, rows, comm, phases, window):
    """A timer for exact training with the trainer's own step (:class:`distnn.step.Stepper`)
    on ``comm``.

    Each call returns the seconds of every ``window`` steps (as rank 0 sees them;
    every step ends in an Allreduce, so the ranks keep pace) and appends its
    per-step milliseconds in the step timer's phases to ``phases``.
    """
    step = Stepper(cfg, comm)
    sent = []

    def once():
        params = model.init_params(cfg.layers, cfg.seed, cfg.activation, cfg.np_dtype)
        velocity = optim.zero_velocity(params, cfg.momentum)
        step.timer.reset()
        windows = []
        comm.Barrier()
        start = time.perf_counter()
        for i, batch in enumerate(rows):
            before = step.timer.bytes
            step(params, velocity, cfg.lr, data, batch)
            sent.append(step.timer.bytes - before)
            if (i + 1) % window == 0:
                windows.append(time.perf_counter() - start)
                start = time.perf_counter()
        comm.Barrier()
        phases.append({k: 1e3 * v / len(rows) for k, v in step.timer.seconds.items()})
        return windows
    return once, sent


class NoNetwork:
    """Rank 0 of ``size`` ranks whose Allreduce calls cost nothing (they return this rank's
    own values): exact_step_loop on it times the local work of one rank's share of each
    batch at that rank count, in this process."""

    rank = 0

    def __init__(self, size):
        self.size = size

    def Barrier(self):
        pass

    def Allreduce(self, sendbuf, recvbuf, op=None):
        if sendbuf is not MPI.IN_PLACE:
            recvbuf[...] = sendbuf
