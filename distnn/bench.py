"""``python -m distnn.bench``: how fast exact training is, where the time goes, and the limit.

For one configuration (default 784-256-10 sigmoid/softmax, batch 256, float32) it measures, on real MNIST rows:

- this machine's GEMM rate (float32 and float64) for the first layer's shape,
  and from it an upper bound on samples/s (per sample: 2 x weights flops forward,
  2 x weights for the weight gradients, 2 x the weights past the first layer
  for the deltas);
- a plain numpy loop of the same network in one process (BLAS products,
  numpy's tanh and exp, numpy's sums, then the same update as training,
  :func:`distnn.optim.update`; :mod:`distnn.bench_loops`), whose bits depend
  on the machine: the in-run reference for the cost of fixed bits;
- exact training with the trainer's own per-step code under ``mpirun -n P`` for
  each rank count (it launches itself), ranks above the core count marked as
  oversubscribed: samples/s, per-step milliseconds in the step timer's phases
  (:mod:`distnn.timing`, as the trainer's metrics: data, compute, comm), the
  bytes each rank contributes to the Allreduce calls per step, and the peak
  resident memory per rank, with the data set in memory and with ``--stream``;
- the ceiling without communication: independent processes, as many as the
  largest measured rank count that fits the cores, each training its share of
  every batch alone, launched and timed the same way;
- the step's Allreduce calls (a MAX of the grids' int64s, of which the stop
  signal's one-int64 MAX costs about the same, and the gradients' SUM) at their
  measured sizes on 2 ranks, over
  shared memory and over TCP (between simulated nodes when launch/nodes.sh has
  them up, else on this host; ``--tcp``), with the rank-to-rank TCP sockets and
  bytes as evidence of the transport (:func:`distnn.allreduce_bench.measure`);
- a model of the step at more ranks, one per node (:mod:`distnn.scaling`): the
  local work of one rank's share of the batch, timed in this process for each
  rank count with a stand-in communicator (no network) and fitted as fixed +
  per-row, plus each Allreduce's alpha-beta time for the algorithm MPICH uses
  at its size on 10, 25 and 100 Gb/s networks (``--networks``, ``--latency-us``):
  modelled step time and scaling efficiency at the configured batch, and the
  smallest batch reaching ``--target`` efficiency;
- for the default recipe, distnn beside PyTorch (:mod:`distnn.bench_compare`):
  PyTorch's samples/s in one process and under DDP over gloo at the measured
  rank counts that fit the cores, and the training seconds until the test
  accuracy first reaches 98 %, distnn's default run (as the README starts it)
  and PyTorch's with the same recipe alternating (``--torch``,
  ``--accuracy-rounds``; PyTorch is skipped with the reason when absent).

The step runs distnn's compiled twins where numba is installed
(:mod:`distnn.compiled`; ``DISTNN_KERNELS=numpy`` for the reference alone); the
table's first line names the path.

Throughput comes from windows of ``--window`` steps: samples per window over
the median window time of all repetitions (after a warm-up), so windows slowed
by other work on a shared machine do not move it. The other figures are
medians of the ``--repeats`` repetitions. The table is printed and written as
JSON and Markdown.
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_info, threadpool_limits

from distnn import allreduce_bench, bench_compare, compiled, model
from distnn import scaling as netmodel
from distnn.bench_loops import (NoNetwork, batch_rows, exact_step_loop, gemm_rate,
                                plain_step_loop, window_seconds)
from distnn.config import DEFAULT_DATA, Config
from distnn.data import Dataset
from distnn.errors import Parser, UserError
from distnn.exact import ExactGradients
from distnn.parallel import SignalAgreement
from distnn.state import N_STATS

SIGNAL_BYTES = SignalAgreement(MPI.COMM_SELF).agreed.nbytes  # the stop signal's Allreduce


def parse_args(argv=None):
    p = Parser(prog="python -m distnn.bench", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="prepared HDF5 file (default data/mnist.h5)")
    p.add_argument("--layers", default="784,256,10", help="layer widths (default 784,256,10)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="precision")
    p.add_argument("--ranks", default="1,2,4", help="rank counts to measure (default 1,2,4)")
    p.add_argument("--steps", type=int, default=200, help="steps per repetition (default 200)")
    p.add_argument("--window", type=int, default=20,
                   help="steps per timed window; throughput uses the median window (default 20)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions after a warm-up (default 5)")
    p.add_argument("--out", default="bench", help="writes OUT.json and OUT.md (default bench)")
    p.add_argument("--tcp", default="auto", choices=["auto", "nodes", "loopback", "off"],
                   help="where to time the Allreduce calls over TCP: between simulated nodes "
                        "(launch/nodes.sh up 2), on this host, auto (nodes when up, else this "
                        "host; the default) or off (shared memory only)")
    p.add_argument("--calls", type=int, default=200,
                   help="timed calls of each Allreduce per launch of that measurement (default 200)")
    p.add_argument("--model-ranks", default="2,4,8,16,32,64",
                   help="rank counts of the model, one rank per node (default 2,4,8,16,32,64)")
    p.add_argument("--networks", default="10,25,100",
                   help="network bandwidths of the model in Gb/s (default 10,25,100)")
    p.add_argument("--latency-us", type=float, default=30.0,
                   help="the model's latency per message in microseconds (default 30: TCP "
                        "over Ethernet, kernel stacks on both ends and one switch)")
    p.add_argument("--target", type=float, default=0.8,
                   help="scaling efficiency for which the model finds the smallest batch (default 0.8)")
    p.add_argument("--torch", default="auto", metavar="{auto,off,PYTHON}",
                   help="PyTorch beside distnn: this interpreter if it imports torch (auto, the "
                        "default), another interpreter that does (a virtual environment's "
                        "python), or off")
    p.add_argument("--accuracy-rounds", type=int, default=1,
                   help="rounds of the time-to-accuracy runs of the default recipe, distnn's "
                        "and PyTorch's alternating (default 1; 0: none)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--independent", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        ranks = [int(r) for r in args.model_ranks.split(",")]
        gbps = [float(g) for g in args.networks.split(",")]
    except ValueError:
        p.error("--model-ranks and --networks take comma-separated numbers")
    if min(ranks) < 1 or min(gbps) <= 0 or args.latency_us < 0 or args.calls < 1:
        p.error("--model-ranks, --networks and --calls must be positive, --latency-us not negative")
    if args.accuracy_rounds < 0:
        p.error("--accuracy-rounds cannot be negative")
    if not 0 < args.target < 1:
        p.error("--target is an efficiency between 0 and 1")
    return args


def window_of(args):
    return max(1, min(args.window, args.steps))


def config_of(args):
    return Config(data=args.data, layers=tuple(int(w) for w in args.layers.split(",")),
                  batch_size=args.batch_size, dtype=args.dtype)


def batch_messages(args, cfg, data, measured):
    """The step's Allreduce calls at global batch B as (count, item bytes): the grid
    agreement's int64s, the stop signal's int64, then (last) the gradient buffer's
    float64s, which has one row of the
    first weight gradient per pixel column used in the batch (the median over batches of
    B rows). ``measured``: the gradient count measured at the configured batch."""
    reducer = ExactGradients(cfg.layers, N_STATS)
    small, counts = reducer.agree.local.size, {cfg.batch_size: measured}
    n_train = data.size("train")

    def messages(batch):
        if batch not in counts:
            rows = ([np.arange(n_train)] if batch >= n_train else
                    batch_rows(data, dataclasses.replace(cfg, batch_size=batch), min(args.steps, 20)))
            counts[batch] = int(statistics.median(
                reducer.first_start + len(data.nonzero_columns(r)) * cfg.layers[1] for r in rows))
        return [(small, 8), (1, SIGNAL_BYTES), (counts[batch], 8)]
    return messages


def model_report(args, cfg, local_ms, messages, limit):
    """The scaling model from the local work per step measured at each rank count
    (``local_ms``: {ranks: ms}) and the messages; JSON-ready."""
    networks = [netmodel.Network(f"{float(g):g} Gb/s", float(g) * 1e9, args.latency_us * 1e-6)
                for g in args.networks.split(",")]
    ranks = [int(r) for r in args.model_ranks.split(",")]
    points = [(netmodel.rows_per_rank(cfg.batch_size, p), ms * 1e-3) for p, ms in local_ms.items()]
    fixed, per_row = (netmodel.fit_line(*zip(*points)) if len(points) > 1
                      else (0.0, points[0][1] / points[0][0]))
    if per_row <= 0:  # timings too noisy to separate (a tiny network): all of it per row
        fixed, per_row = 0.0, local_ms[1] * 1e-3 / cfg.batch_size
    gamma = allreduce_bench.reduce_rate(messages(cfg.batch_size)[-1][0], args.repeats * 4)
    fitted = netmodel.StepModel(per_row, max(fixed, 0.0), messages, gamma)
    proportional = netmodel.StepModel(local_ms[1] * 1e-3 / cfg.batch_size, 0.0, messages, gamma)
    return {"latency_us": args.latency_us, "networks": [n.name for n in networks],
            "target": args.target, "batch_limit": limit, "local_ms": local_ms,
            "fixed_ms": 1e3 * fitted.fixed_s, "per_row_us": 1e6 * per_row,
            "reduce_gb_per_s": gamma / 1e9, "messages": messages(cfg.batch_size),
            "rows": netmodel.model_tables(fitted, networks, ranks, cfg.batch_size, args.target, limit),
            "proportional_min_batch": {
                n.name: {p: netmodel.min_batch(proportional, p, n, args.target, limit) for p in ranks}
                for n in networks}}


def check_at_two(report, local_ms):
    """The model's 2-rank step on this host (local work + the measured shared-memory calls)
    next to the measured 2-rank runs; None without them."""
    runs = {(r["ranks"], r["stream"], r.get("independent", False)): r for r in report["runs"]}
    two, alone = runs.get((2, False, False)), runs.get((2, False, True))
    if 2 not in local_ms or two is None or alone is None:
        return None
    shm = report["allreduce"]["shm"]
    shm_ms = shm["sum_ms"] + 2 * shm["max_us"] / 1e3  # the grids' and the signal's MAX
    return {"local_ms": local_ms[2], "shm_ms": shm_ms, "model_ms": local_ms[2] + shm_ms,
            "measured_ms": 1e3 * two["samples_per_step"] / two["samples_per_s"],
            "independent_ms": 1e3 * alone["samples_per_step"] / alone["samples_per_s"]}


def worker(args):
    """One rank of an exact-training measurement; rank 0 writes the result JSON."""
    threadpool_limits(limits=1, user_api="blas")
    comm = MPI.COMM_WORLD
    cfg = config_of(args)
    data = Dataset(cfg.data, val_size=0, stream=args.stream)
    rows = batch_rows(data, cfg, args.steps)
    train_comm = comm
    if args.independent:  # each rank trains its share of every batch alone
        share = cfg.batch_size // comm.size
        rows = [r[comm.rank * share:(comm.rank + 1) * share] for r in rows]
        cfg, train_comm = dataclasses.replace(cfg, batch_size=share), MPI.COMM_SELF
    phases = []
    once, sent = exact_step_loop(cfg, data, rows, train_comm, phases, window_of(args))
    windows = window_seconds(once, args.repeats)
    windows = np.max(comm.allgather(windows), axis=0).tolist()  # each window: the slowest rank
    peak_mb = max(comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    if comm.rank == 0:
        result = {"ranks": comm.size, "stream": args.stream, "independent": args.independent,
                  "window_s": windows,  # samples per step: all processes' rows
                  "samples_per_step": len(rows[0]) * (comm.size if args.independent else 1),
                  **{f"{k}_ms": statistics.median(t[k] for t in phases[1:]) for k in phases[0]},
                  "allreduce_bytes_per_step": 0 if args.independent else int(statistics.median(sent)),
                  "peak_rss_mb": peak_mb}
        Path(args.result).write_text(json.dumps(result))


def run_worker(args, ranks, repeats, stream=False, independent=False):
    """Launch this module under ``mpirun -n ranks``; return its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [allreduce_bench.mpirun(), "-n", str(ranks), sys.executable,
                   "-m", "distnn.bench", "--worker", "--result", str(out), "--data", args.data,
                   "--layers", args.layers, "--batch-size", str(args.batch_size),
                   "--dtype", args.dtype,
                   "--steps", str(args.steps), "--window", str(args.window),
                   "--repeats", str(repeats)]
        done = subprocess.run(command + (["--stream"] if stream else [])
                              + (["--independent"] if independent else []),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"distnn.bench: error: the {ranks}-rank run failed:\n{done.stderr}")
        return json.loads(out.read_text())


def summarize(args, results):
    """One run's figures from the results of several launches: samples/s from the
    median window of all of them, the other figures as medians."""
    windows = [w for r in results for w in r.pop("window_s")]
    return {**results[0], "samples_per_s": window_of(args) * results[0]["samples_per_step"]
            / statistics.median(windows),
            **{k: statistics.median(r[k] for r in results)
               for k in results[0] if k.endswith(("_ms", "_mb"))}}


def scaling(args, ranks, cores):
    """Per rank count, the figures of ``repeats`` rounds, then the ceiling without
    communication; they alternate each round, so they all see the same machine load."""
    runs = [(p, False) for p in ranks]
    ceiling = max((p for p in ranks if 1 < p <= cores), default=None)
    runs += [(ceiling, True)] if ceiling else []
    rounds = [[run_worker(args, p, 1, independent=i) for p, i in runs]
              for _ in range(args.repeats)]
    return [summarize(args, [r[k] for r in rounds]) for k in range(len(runs))]


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    blas = next((f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
                 for i in threadpool_info() if i.get("user_api") == "blas"), "unknown")
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas, "mpi": MPI.Get_library_version().splitlines()[0],
            "kernels": compiled.ACTIVE}


def markdown(report):
    cfg, m = report["config"], report["machine"]
    fan_in, fan_out = cfg["layers"].split(",")[:2]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, numpy {m['numpy']}, "
             f"{m['blas']}; {m['mpi']}; {m['kernels']} kernels. One BLAS thread per process.",
             f"Network {cfg['layers']}, batch {cfg['batch_size']}, "
             f"{cfg['dtype']}; {cfg['repeats']} repetitions of {cfg['steps']} steps after a "
             f"warm-up; samples/s from the median {report['window']}-step window.",
             "",
             f"- GEMM {cfg['batch_size']} x {fan_in} x {fan_out}: float32 "
             f"{report['gemm_gflops']['float32']:.1f} GFLOP/s, float64 "
             f"{report['gemm_gflops']['float64']:.1f} GFLOP/s; upper bound at the {cfg['dtype']} "
             f"rate: {report['bound_samples_per_s']:,.0f} samples/s per core.",
             f"- In one process, alternating: plain numpy loop {report['plain_samples_per_s']:,.0f} "
             f"samples/s, exact {report['exact_samples_per_s']:,.0f} samples/s: "
             f"**{report['exact_vs_plain']:.2f}x** the plain loop.",
             "", "| ranks | data | samples/s | vs 1 rank | of bound | data ms | compute ms "
             "| comm ms | Allreduce bytes/step | peak RSS/rank |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r["samples_per_s"] for r in report["runs"] if r["ranks"] == 1 and not r["stream"]),
                float("nan"))  # "vs 1 rank" needs a 1-rank run
    for r in report["runs"]:
        over = (" (oversubscribed)" if r["ranks"] > m["cores"] else
                ", no communication" if r.get("independent") else "")
        bound = report["bound_samples_per_s"] * min(r["ranks"], m["cores"])
        lines.append(
            f"| {r['ranks']}{over} | {'stream' if r['stream'] else 'memory'} | "
            f"{r['samples_per_s']:,.0f} | {r['samples_per_s'] / base:.2f} | "
            f"{r['samples_per_s'] / bound:.0%} | {r['data_ms']:.2f} | {r['compute_ms']:.2f} | "
            f"{r['comm_ms']:.2f} | {r['allreduce_bytes_per_step']:,} | {r['peak_rss_mb']:.0f} MB |")
    return ("\n".join(lines) + "\n"
            + netmodel.markdown(report["allreduce"], report["model"], cfg["batch_size"]))


def compares(args):
    """Whether to put distnn beside PyTorch: for the default recipe only."""
    cfg = config_of(args)
    return bool(args.accuracy_rounds) and (cfg.layers, cfg.batch_size, cfg.dtype) == \
        (Config.layers, Config.batch_size, Config.dtype)


def compare(args, data, report, torch):
    """distnn beside PyTorch (:mod:`distnn.bench_compare`) at the measured rank counts
    that fit the cores, ``torch`` being :func:`distnn.bench_compare.torch_python`'s
    answer; the Markdown section, and the figures in ``report``."""
    if not compares(args):
        return ""
    cores = report["machine"]["cores"]
    processes = sorted({r["ranks"] for r in report["runs"] if r["ranks"] <= cores})
    python, skipped = torch
    recipe = {k: getattr(Config, k) for k in ("lr", "momentum", "schedule", "warmup",
                                               "decay_every", "decay_factor", "epochs",
                                               "batch_size")}
    recipe.update(steps=args.steps, window=window_of(args), repeats=args.repeats, target=0.98)
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "mnist.npz"
        default = Dataset(args.data, val_size=Config.val_size, seed=Config.seed)
        bench_compare.write_data(npz, default, model.init_params(Config.layers, Config.seed))
        default.close()
        report["compare"] = bench_compare.side_by_side(
            python, allreduce_bench.mpirun(), args.data, npz, recipe, processes,
            args.accuracy_rounds)
    report["compare"]["pytorch_skipped"] = skipped
    ours = {r["ranks"]: r["samples_per_s"] for r in report["runs"]
            if not r["stream"] and not r.get("independent")}
    return bench_compare.markdown(report["compare"], ours, skipped)


def main(argv=None):
    try:
        args = parse_args(argv)
        if not args.worker and not Path(args.out).resolve().parent.is_dir():  # now, not later
            raise UserError(f"--out {args.out}: the folder {Path(args.out).parent} does not exist")
        named = args.torch not in ("auto", "off")  # checked before the runs, needed or not
        torch = bench_compare.torch_python(args.torch) \
            if not args.worker and (named or compares(args)) else None
    except UserError as exc:
        print(f"distnn.bench: error: {exc}", file=sys.stderr)
        return 2
    if args.worker:
        return worker(args)
    threadpool_limits(limits=1, user_api="blas")
    cfg = config_of(args)
    data = Dataset(cfg.data, val_size=0)
    rows = batch_rows(data, cfg, args.steps)
    layers = cfg.layers
    weights = sum(i * o for i, o in zip(layers[:-1], layers[1:]))
    flops_per_sample = 2 * weights + 2 * weights + 2 * (weights - layers[0] * layers[1])
    rates = {dt: gemm_rate(dt, cfg.batch_size, layers[0], layers[1], args.repeats)
             for dt in ("float32", "float64")}
    window = window_of(args)
    plain = plain_step_loop(cfg, data, rows, window)
    exact, sent = exact_step_loop(cfg, data, rows, MPI.COMM_SELF, [], window)
    model_ranks = [p for p in map(int, args.model_ranks.split(",")) if p > 1]
    shares = {p: exact_step_loop(cfg, data, rows, NoNetwork(p), [], window)[0] for p in model_ranks}
    plain(), exact(), [once() for once in shares.values()]  # warm-up
    rounds = [(plain(), exact(), {p: once() for p, once in shares.items()})
              for _ in range(args.repeats)]  # alternating
    plain_s = statistics.median(w for p, _, _ in rounds for w in p)
    exact_s = statistics.median(w for _, e, _ in rounds for w in e)
    local_ms = {1: 1e3 * exact_s / window,
                **{p: 1e3 * statistics.median(w for _, _, s in rounds for w in s[p]) / window
                   for p in model_ranks}}
    agree = ExactGradients(cfg.layers, N_STATS).agree.local
    grad_count = (statistics.median_low(sent) - agree.nbytes - SIGNAL_BYTES) // 8
    messages = batch_messages(args, cfg, data, grad_count)
    samples = window * cfg.batch_size
    report = {"config": {k: getattr(args, k) for k in ("layers", "batch_size", "dtype", "steps", "repeats")},
              "window": window,
              "machine": machine(), "gemm_gflops": rates,
              "bound_samples_per_s": rates[cfg.dtype] * 1e9 / flops_per_sample,
              "plain_samples_per_s": samples / plain_s, "exact_samples_per_s": samples / exact_s,
              "exact_vs_plain": plain_s / exact_s,
              "runs": scaling(args, [int(r) for r in args.ranks.split(",")],
                              len(os.sched_getaffinity(0)))}
    report["runs"].append(summarize(args, [run_worker(args, 1, args.repeats, stream=True)]))
    report["allreduce"] = allreduce_bench.measure(grad_count, agree.size, args.calls, args.repeats, args.tcp)
    report["model"] = model_report(args, cfg, local_ms, messages, data.size("train"))
    report["model"]["check_p2"] = check_at_two(report, local_ms)
    table = markdown(report) + compare(args, data, report, torch)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(table)
    print(table + f"\nwrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    sys.exit(main())
