"""The scaling model: the step time and efficiency at larger rank counts.

The step time of ``P`` ranks, one per node, at global batch ``B`` is
``fixed + per_row * ceil(B / P)`` (the local work, fitted to in-process timings
of one rank's share) plus, for ``P > 1``, the alpha-beta(-gamma) cost of each
Allreduce with the algorithm that MPICH 5.0 selects by default for its size
(:func:`allreduce_algorithm`). Scaling efficiency is
``E(P, B) = T(1, B) / (P * T(P, B))``. Pure functions, and the Markdown that
distnn.bench prints with the measured Allreduce times
(:mod:`distnn.allreduce_bench`).
"""

import dataclasses
import math

import numpy as np

RECURSIVE_DOUBLING = "recursive doubling"
RABENSEIFNER = "reduce-scatter + allgather"


# -- Model (pure functions) ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Network:
    """A network as the model sees it: payload bandwidth and per-message latency."""
    name: str
    bits_per_s: float
    latency_s: float


def pof2(ranks):
    """The largest power of two not above ``ranks``."""
    return 1 << (ranks.bit_length() - 1)


def allreduce_algorithm(count, item_bytes, ranks, builtin_op=True):
    """The algorithm MPICH 5.0 uses by default for an Allreduce of ``count`` items.

    MPICH's compiled-in selection (the JSON tree in libmpi, MPIR level; CH4 hands a
    communicator with one rank per node to its netmod, which calls it) takes
    recursive doubling for messages of at most 8 bytes, user-defined operations
    and ``count`` below the largest power of two in the communicator, and
    Rabenseifner's reduce-scatter + allgather for everything else. (The older
    ``MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE`` of 2048 bytes no longer decides.)
    """
    if count * item_bytes <= 8 or not builtin_op or count < pof2(ranks):
        return RECURSIVE_DOUBLING
    return RABENSEIFNER


def allreduce_seconds(count, item_bytes, ranks, network, reduce_bytes_per_s=math.inf):
    """Alpha-beta-gamma time of one Allreduce on ``ranks`` ranks (0 for one rank).

    With ``n`` bytes, ``p`` = :func:`pof2`, ``alpha`` the latency, ``beta`` seconds per
    byte on the wire and ``gamma`` seconds per byte reduced:

    - recursive doubling: ``log2(p) * (alpha + n*beta + n*gamma)``;
    - reduce-scatter + allgather: ``2*log2(p)*alpha + 2*(p-1)/p*n*beta + (p-1)/p*n*gamma``;
    - ranks beyond ``p`` first hand their whole vector to a partner, which reduces
      it, and get the result back at the end: ``2*(alpha + n*beta) + n*gamma`` more.
    """
    if ranks <= 1:
        return 0.0
    n = count * item_bytes
    alpha, beta, gamma = network.latency_s, 8 / network.bits_per_s, 1 / reduce_bytes_per_s
    p = pof2(ranks)
    steps = math.log2(p)
    extra = 2 * (alpha + n * beta) + n * gamma if ranks > p else 0.0
    if allreduce_algorithm(count, item_bytes, ranks) == RECURSIVE_DOUBLING:
        return extra + steps * (alpha + n * beta + n * gamma)
    return extra + 2 * steps * alpha + (p - 1) / p * n * (2 * beta + gamma)


@dataclasses.dataclass(frozen=True)
class StepModel:
    """What the model needs of a configuration.

    ``fixed_s + per_row_s * rows`` is one rank's local work per step (everything but
    the network) for ``rows`` rows of a global batch; ``messages(B)`` lists the
    step's Allreduce calls at global batch ``B`` as (count, item bytes) pairs;
    ``reduce_bytes_per_s`` is the rate at which a rank adds received data into its own.
    """
    per_row_s: float
    fixed_s: float
    messages: object  # callable: global batch -> [(count, item_bytes), ...]
    reduce_bytes_per_s: float = math.inf


def rows_per_rank(batch, ranks):
    """Rows of the busiest rank (``distnn.parallel.row_range`` gives the remainder to the first ranks)."""
    return -(-batch // ranks)


def compute_seconds(model, ranks, batch):
    return model.fixed_s + model.per_row_s * rows_per_rank(batch, ranks)


def comm_seconds(model, ranks, batch, network):
    return sum(allreduce_seconds(count, size, ranks, network, model.reduce_bytes_per_s)
               for count, size in model.messages(batch))


def step_seconds(model, ranks, batch, network):
    """Modelled time of one step of ``ranks`` ranks at global batch ``batch``."""
    return compute_seconds(model, ranks, batch) + comm_seconds(model, ranks, batch, network)


def efficiency(model, ranks, batch, network):
    """Scaling efficiency ``T(1, B) / (P * T(P, B))``: samples/s per rank against one rank."""
    return step_seconds(model, 1, batch, network) / (ranks * step_seconds(model, ranks, batch, network))


def min_batch(model, ranks, network, target=0.8, limit=60000):
    """The smallest global batch, a multiple of ``ranks``, at which ``ranks`` ranks reach
    efficiency ``target``; None if none up to ``limit`` does. (Efficiency rises with the
    batch: the local work grows with it, the Allreduce calls hardly.)"""
    def reaches(k):
        return efficiency(model, ranks, k * ranks, network) >= target
    lo, hi = 1, limit // ranks
    if hi < 1 or not reaches(hi):
        return None
    while lo < hi:  # the smallest k that reaches the target
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid + 1, hi)
    return lo * ranks


def fit_line(xs, ys):
    """Least-squares (intercept, slope) of ys against xs."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(intercept), float(slope)


def model_tables(model, networks, ranks_list, batch, target=0.8, limit=60000):
    """The modelled step at ``batch`` for each rank count and network, and the smallest
    batch reaching ``target`` efficiency (as a JSON-ready dict)."""
    rows = []
    for p in ranks_list:
        rows.append({"ranks": p, "rows_per_rank": rows_per_rank(batch, p),
                     "compute_ms": 1e3 * compute_seconds(model, p, batch),
                     "algorithms": [allreduce_algorithm(c, s, p) for c, s in model.messages(batch)],
                     **{net.name: {"allreduce_ms": 1e3 * comm_seconds(model, p, batch, net),
                                   "step_ms": 1e3 * step_seconds(model, p, batch, net),
                                   "efficiency": efficiency(model, p, batch, net),
                                   "min_batch": min_batch(model, p, net, target, limit)}
                        for net in networks}})
    return rows


# -- Report ---------------------------------------------------------------------------

def _per_net(row, networks, key, fmt):
    return " / ".join(fmt(row[n][key]) for n in networks)


def implied_network(tcp, count, small, reduce_bytes_per_s):
    """(latency s, payload bits/s) that make the model give the 2-rank TCP measurement:
    both calls are reduce-scatter + allgather at P = 2, MAX = 2 alpha (its bytes are
    negligible) and SUM = 2 alpha + n beta + n/2 gamma."""
    alpha = tcp["max_us"] * 1e-6 / 2
    n = 8 * count
    wire = tcp["sum_ms"] * 1e-3 - 2 * alpha - n / 2 / reduce_bytes_per_s
    return alpha, (8 * n / wire if wire > 0 else math.inf)


def markdown(allreduce, model, batch):
    """The Markdown section of distnn.bench: measured Allreduce times, the model's table
    at ``batch`` and the smallest batch for the target efficiency."""
    lines = (_measured_section(allreduce, model["reduce_gb_per_s"] * 1e9) + _model_section(model)
             + _model_table(model) + _min_batch_section(model, batch))
    return "\n".join(lines) + "\n"


def _measured_section(allreduce, reduce_bytes_per_s):
    """The 2-rank Allreduce measurement: its method, a row per transport, the TCP reading."""
    small, count = allreduce["small"], allreduce["count"]
    lines = ["", f"**Allreduce, 2 ranks, measured**: the step's two sizes of call, "
             f"Allreduce(MAX) of {small} int64, then in-place Allreduce(SUM) of {count:,} "
             f"float64; medians (quartiles) of {allreduce['shm']['calls']:,} calls each over "
             f"{allreduce['shm']['launches']} alternating launches, each call the slower rank's "
             "time after a Barrier. The last column: the TCP sockets joining the two ranks (ss) "
             "and the bytes rank 0 received on them per byte of SUM payload."
             + (f" TCP {allreduce['note']}." if allreduce["note"] else ""), "",
             f"| transport | where | Allreduce(MAX) {8 * small} B | Allreduce(SUM) {8 * count:,} B "
             "| TCP between the ranks |", "|---|---|---|---|---|"]
    for key in ("shm", "tcp"):
        if allreduce[key] is not None:
            lines.append(_measured_row("shared memory" if key == "shm" else "TCP", allreduce[key]))
    if allreduce["tcp"]:
        alpha, bits = implied_network(allreduce["tcp"], count, small, reduce_bytes_per_s)
        lines += ["", f"Read through the model below, the TCP figures are {1e6 * alpha:.0f} µs "
                  f"per message and {bits / 1e9:.0f} Gb/s of payload (kernel copies, no wire)."]
    return lines


def _measured_row(transport, r):
    """One transport's table row: median (quartile) times and the TCP evidence of its route."""
    evidence = ("not checked (no ss)" if r["rank_sockets"] is None else
                f"{r['rank_sockets']} socket(s), {r['tcp_bytes_per_payload_byte']:.2f} B/B")
    return (f"| {transport} | {r['where']} | "
            f"{r['max_us']:.1f} µs ({r['max_us_iqr'][0]:.1f}–{r['max_us_iqr'][1]:.1f}) | "
            f"{r['sum_ms']:.3f} ms ({r['sum_ms_iqr'][0]:.3f}–{r['sum_ms_iqr'][1]:.3f}) | "
            f"{evidence} |")


def _model_section(model):
    """The model's formula and parameters, and its check against the 2-rank measurement."""
    local = ", ".join(f"{ms:.2f}" for ms in model["local_ms"].values())
    at = ", ".join(str(p) for p in model["local_ms"])
    lines = ["", "**Model, one rank per node**: T(P, B) = local work + the step's three Allreduce calls, "
             f"E = T(1, B) / (P T(P, B)). Local work = {model['fixed_ms']:.2f} ms + "
             f"{model['per_row_us']:.2f} µs per row of the busiest rank: a line through this "
             f"process's timings of one rank's share with no network (P = {at}: {local} ms). "
             "Each Allreduce: MPICH 5.0's default algorithm for its size (recursive doubling up "
             "to 8 B or with fewer items than the largest power of two in P, else reduce-scatter "
             f"+ allgather), {model['latency_us']:g} µs per message, the line rate as payload "
             f"bandwidth, reduction at {model['reduce_gb_per_s']:.1f} GB/s (float64 add here).", ""]
    check = model.get("check_p2")
    if check:
        lines += [f"Check at P = 2 on this host: local work {check['local_ms']:.2f} ms + the "
                  f"measured shared-memory calls {check['shm_ms']:.2f} ms = {check['model_ms']:.2f} "
                  f"ms a step; measured {check['measured_ms']:.2f} ms (without communication "
                  f"{check['independent_ms']:.2f} ms). The model leaves out the ranks' waiting "
                  "for each other.", ""]
    return lines


def _model_table(model):
    """The modelled step per rank count: local work, Allreduce, step and efficiency per network."""
    nets = model["networks"]
    gbps = " / ".join(n.split()[0] for n in nets) + " Gb/s"
    lines = [f"| P | rows/rank | local ms | Allreduce ms at {gbps} | step ms at {gbps} "
             f"| efficiency at {gbps} |", "|---|---|---|---|---|---|"]
    for row in model["rows"]:
        lines.append(f"| {row['ranks']} | {row['rows_per_rank']} | {row['compute_ms']:.2f} | "
                     f"{_per_net(row, nets, 'allreduce_ms', lambda v: f'{v:.2f}')} | "
                     f"{_per_net(row, nets, 'step_ms', lambda v: f'{v:.2f}')} | "
                     f"{_per_net(row, nets, 'efficiency', lambda v: f'{v:.0%}')} |")
    return lines


def _min_batch_section(model, batch):
    """The smallest batch for the target efficiency per rank count and network, and at the
    largest rank count without the fixed part of the local work."""
    nets = model["networks"]

    def batch_cell(b, p):
        return f"> {model['batch_limit']:,}" if b is None else f"{b:,} ({b // p:,}/rank)"
    lines = ["", f"Smallest global batch (a multiple of P) for {model['target']:.0%} efficiency; "
             f"the gradient message grows with the batch, {8 * model['messages'][-1][0]:,} B at "
             f"{batch}:", "", f"| P | {' | '.join(nets)} |", "|---|" + "---|" * len(nets)]
    for row in model["rows"]:
        p = row["ranks"]
        lines.append(f"| {p} | " + " | ".join(batch_cell(row[n]["min_batch"], p) for n in nets) + " |")
    prop = model["proportional_min_batch"]
    last = model["rows"][-1]["ranks"]
    lines += ["", f"With the whole 1-rank step divided by P instead (no fixed part), P = {last} "
              "would need " + ", ".join(f"{batch_cell(prop[n][last], last)} at {n}" for n in nets)
              + "."]
    return lines
