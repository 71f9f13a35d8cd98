"""The step's Allreduce calls over shared memory and over TCP, measured on 2 ranks.

The step's two sizes of call at their real sizes (the stop signal's one-int64
MAX is the same kind of call as the first), an ``Allreduce(MAX)`` of the grid
agreement's int64s, then an in-place ``Allreduce(SUM)`` of the float64 gradient
buffer, timed call by call on 2 ranks (each call the slower rank's time, after a
Barrier), once over shared memory (MPICH's and UCX's defaults on one host) and
once over TCP only (``UCX_TLS=tcp,self``): between two simulated nodes when they
are up (``launch/nodes.sh``), otherwise over this host's own TCP
(``MPIR_CVAR_NOLOCAL=1`` too, or MPICH would still take its shared memory). Each
rank then lists its established TCP sockets (``ss``); the sockets that join rank
0 to rank 1, and the bytes rank 0 received on them, show which transport carried
the data. distnn.bench runs :func:`measure`; each launch runs this module's
:func:`main` on the ranks.
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NODES_STATE = Path("/run/distnn-nodes")  # launch/nodes.sh's


def reduce_rate(count, repeats=20):
    """Bytes/s of adding ``count`` float64 into a buffer in place (the gamma term)."""
    a, b = np.zeros(count), np.ones(count)

    def once():
        start = time.perf_counter()
        np.add(a, b, out=a)
        return time.perf_counter() - start
    once()
    return 8 * count / statistics.median(once() for _ in range(repeats))


def parse_ss(listing, pid):
    """[local, peer, bytes received] of process ``pid``'s sockets in ``ss -tinpH`` output."""
    found, current = [], None
    for line in listing.splitlines():
        if line[:1].strip():  # a socket's line; the next, indented, has its counters
            fields = line.split()
            current = fields[2:4] if f"pid={pid}," in line else None
        elif current:
            received = re.search(r"\bbytes_received:(\d+)", line)
            found.append([*current, int(received.group(1)) if received else 0])
            current = None
    return found


def tcp_sockets(pid):
    """:func:`parse_ss` of process ``pid``'s established TCP sockets in its network
    namespace; None when ``ss`` cannot be run."""
    try:
        listing = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True,
                                 text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_ss(listing, pid)


def rank_links(mine, theirs):
    """The sockets of ``mine`` whose other end is one of ``theirs`` (both from :func:`tcp_sockets`)."""
    ends = {(local, peer) for local, peer, _ in theirs}
    return [s for s in mine if (s[1], s[0]) in ends]


def worker(result, count, small, calls, warmup):
    """One rank of a measurement (``python -m distnn.scaling``); rank 0 writes ``result``."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    grads = np.zeros(count)
    local, agreed = np.zeros(small, np.int64), np.zeros(small, np.int64)
    times = {"max_s": [], "sum_s": []}
    for i in range(warmup + calls):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(local, agreed, op=MPI.MAX)
        t1 = time.perf_counter()
        comm.Barrier()
        t2 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
        t3 = time.perf_counter()
        if i >= warmup:
            times["max_s"].append(t1 - t0)
            times["sum_s"].append(t3 - t2)
    times = {k: np.max(comm.allgather(v), axis=0).tolist() for k, v in times.items()}
    sockets = comm.allgather(tcp_sockets(os.getpid()))
    hosts = comm.allgather(socket.gethostname())
    if comm.rank == 0:
        links = None if None in sockets else rank_links(sockets[0], sockets[1])
        with open(result, "w") as f:
            json.dump({**times, "hosts": hosts, "calls_total": warmup + calls,
                       "rank_sockets": None if links is None else len(links),
                       "tcp_received_bytes": None if links is None else sum(s[2] for s in links),
                       "mpi": MPI.Get_library_version().splitlines()[0]}, f)


def mpirun():
    """mpirun beside this Python (the mpich wheel's) or else on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else "mpirun"


def on_nodes(hosts=None):
    """The mpirun command prefix that starts ranks on launch/nodes.sh's simulated nodes
    (``hosts``: hydra's ``node1:2,node2:2``; None when MPMD blocks fill the hostfile's
    order instead), through launch/node-exec in place of ssh."""
    command = [mpirun(), "-launcher", "ssh", "-launcher-exec", str(ROOT / "launch" / "node-exec"),
               "-localhost", (NODES_STATE / "host-address").read_text().strip()]
    return command + (["-hosts", hosts] if hosts else [])


def nodes_up():
    """The first two simulated nodes' names if launch/nodes.sh has them up, else None."""
    try:
        names = [line.split(":")[0] for line in (NODES_STATE / "hostfile").read_text().split()]
        (NODES_STATE / "host-address").read_text()
    except OSError:
        return None
    return names[:2] if len(names) >= 2 and (ROOT / "launch" / "node-exec").exists() else None


WHERE = {"shm": "one host, MPICH's and UCX's defaults",
         "nodes": "simulated nodes {0} and {1} (network namespaces on a bridge, veth), "
                  "UCX_TLS=tcp,self",
         "loopback": "this host's own TCP, UCX_TLS=tcp,self, MPIR_CVAR_NOLOCAL=1"}


def launch(route, count, small, calls, warmup, tmp, nodes=None):
    """One 2-rank measurement over ``route`` (shm, nodes or loopback); its result dict."""
    env = {k: v for k, v in os.environ.items() if k not in ("UCX_TLS", "MPIR_CVAR_NOLOCAL")}
    command = on_nodes(",".join(f"{n}:1" for n in nodes)) if route == "nodes" else [mpirun()]
    if route != "shm":
        env["UCX_TLS"] = "tcp,self"
    if route == "loopback":  # else MPICH's own shared memory carries ranks on one host
        env["MPIR_CVAR_NOLOCAL"] = "1"
    out = Path(tmp) / f"allreduce-{route}.json"
    out.unlink(missing_ok=True)
    command += ["-n", "2", sys.executable, "-m", "distnn.allreduce_bench", "--result", str(out),
                "--count", str(count), "--small", str(small), "--calls", str(calls),
                "--warmup", str(warmup)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the {route} Allreduce measurement took over 300 s")
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"the {route} Allreduce measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())


def summarize(route, results, count, nodes=None):
    """Medians and quartiles of all calls of ``results`` (one route's launches), and what
    the sockets say about the transport."""
    def quartiles(key, scale):
        q1, med, q3 = np.percentile([t for r in results for t in r[key]], [25, 50, 75])
        return scale * med, [scale * q1, scale * q3]
    ratios = [None if r["tcp_received_bytes"] is None
              else r["tcp_received_bytes"] / (r["calls_total"] * 8 * count) for r in results]
    known = None not in ratios
    over_tcp = (None if not known or len({x > 0.5 for x in ratios}) > 1  # unknown or mixed
                else ratios[0] > 0.5)
    sum_ms, sum_iqr = quartiles("sum_s", 1e3)
    max_us, max_iqr = quartiles("max_s", 1e6)
    return {"route": route, "where": WHERE[route].format(*(nodes or ["", ""])),
            "hosts": results[-1]["hosts"], "launches": len(results),
            "calls": sum(len(r["sum_s"]) for r in results),
            "sum_ms": sum_ms, "sum_ms_iqr": sum_iqr, "max_us": max_us, "max_us_iqr": max_iqr,
            "rank_sockets": results[-1]["rank_sockets"],
            "tcp_bytes_per_payload_byte": statistics.median(ratios) if known else None,
            "over_tcp": over_tcp}


def measure(count, small, calls, rounds, tcp="auto", warmup=20):
    """The step's two sizes of Allreduce call on 2 ranks over shared memory and over TCP,
    launches alternating for ``rounds`` rounds. ``tcp``: auto (simulated nodes when up,
    else this host), nodes, loopback or off. Returns {"shm": ..., "tcp": ... or None,
    "note": ...}."""
    nodes = nodes_up()
    if tcp == "nodes" and nodes is None:
        raise SystemExit("distnn.bench: error: --tcp nodes: no simulated nodes are up "
                         "(as root: bash launch/nodes.sh up 2)")
    route = None if tcp == "off" else ("nodes" if nodes else "loopback") if tcp == "auto" else tcp
    note = None
    runs = {"shm": [], route: []} if route else {"shm": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for r in list(runs):
                try:
                    runs[r].append(launch(r, count, small, calls, warmup, tmp, nodes))
                except RuntimeError as e:
                    if r != "nodes" or tcp == "nodes":
                        raise SystemExit(f"distnn.bench: error: {e}")
                    # the nodes went away (or never worked): this host's TCP instead
                    note = f"on this host: the run on the simulated nodes failed ({e})"
                    del runs["nodes"]
                    route = "loopback"
                    runs["loopback"] = [launch("loopback", count, small, calls, warmup, tmp)]
    return {"shm": summarize("shm", runs["shm"], count),
            "tcp": summarize(route, runs[route], count, nodes) if route else None,
            "count": count, "small": small, "note": note}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distnn.allreduce_bench",
                                description="One rank of distnn.bench's Allreduce measurement "
                                            "(run under mpirun -n 2 by distnn.bench).")
    p.add_argument("--result", required=True, help="JSON file rank 0 writes")
    p.add_argument("--count", type=int, required=True, help="float64 values in the Allreduce(SUM)")
    p.add_argument("--small", type=int, required=True, help="int64 values in the Allreduce(MAX)")
    p.add_argument("--calls", type=int, default=200, help="timed calls of each (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls first (default 20)")
    a = p.parse_args(argv)
    worker(a.result, a.count, a.small, a.calls, a.warmup)


if __name__ == "__main__":
    sys.exit(main())
