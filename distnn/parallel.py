"""Everything about ranks working together, apart from the exact sums themselves.

Which rows each rank works on (:func:`row_range`), the same settings and
data on every rank (:func:`check_same_settings`), parameters that start
identical on every rank (:func:`broadcast_params`, :func:`share_state`), the
per-step agreement on a
stop signal (:class:`SignalAgreement`), the check that every replica holds the
same weights (:func:`check_replicas`), and ending cleanly.

A Python exception on one rank must not leave the others waiting forever in
a collective call. ``agree`` runs a check on every rank and turns any rank's
clean exit (a UserError, an OutputError, ...) into the same exit everywhere;
``run_or_abort`` ends the whole job with ``MPI.Abort`` when a rank fails on
its own (the fix ``python -m mpi4py`` applies); ``finish`` ends a rank within a
bounded time even when its peers are gone.
"""

import dataclasses
import faulthandler
import json
import os
import sys
import time
import traceback

import numpy as np
from mpi4py import MPI

from distnn import model
from distnn.config import differences
from distnn.errors import (
    CleanExit,
    Diverged,
    HungUp,
    Interrupted,
    NoRoom,
    OutputError,
    Stopped,
    UserError,
)
from distnn.state import TrainState

EXIT_FAILURE = 1
ABORT_GRACE_S = 0.3
FINISH_WAIT_S = 10  # how long a rank waits at the end for its peers before leaving alone
AGREED = {cls.__name__: cls for cls in (UserError, OutputError, NoRoom, Diverged, Stopped,
                                         Interrupted, HungUp)}


def row_range(n_rows, size, rank):
    """The contiguous rows [lo, hi) of ``n_rows`` that ``rank`` of ``size`` works on."""
    base, extra = divmod(n_rows, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def my_rows(positions, comm):
    """This rank's contiguous share of ``positions`` (:func:`row_range`)."""
    lo, hi = row_range(len(positions), comm.size, comm.rank)
    return positions[lo:hi]


def broadcast_params(comm, params):
    """``params`` with rank 0's values on every rank (in place)."""
    for W, b in params:
        comm.Bcast(W, root=0)
        comm.Bcast(b, root=0)
    return params


class SignalAgreement:
    """The largest stop signal number any rank received (0 for none), agreed once per
    step with one 8-byte Allreduce(MAX), so every rank stops after the same step."""

    def __init__(self, comm):
        self.comm = comm
        self.local = np.zeros(1, np.int64)
        self.agreed = np.zeros(1, np.int64)

    def __call__(self, signum):
        self.local[0] = signum
        self.comm.Allreduce(self.local, self.agreed, op=MPI.MAX)
        return int(self.agreed[0])


def check_same_settings(comm, cfg, fingerprint):
    """Refuse to start when ranks were given different settings or data files."""
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "data"}
    everyone = comm.allgather((mine, fingerprint, cfg.data))
    settings0, fingerprint0, path0 = everyone[0]
    for rank, (settings, fp, path) in enumerate(everyone[1:], start=1):
        if fp != fingerprint0:
            raise UserError(f"rank {rank} reads a different data file ({path}) from rank 0 "
                            f"({path0}); every rank must use the same data", agreed=True)
        diffs = differences(settings0, settings, fields=sorted(settings0))
        if diffs:
            raise UserError(f"rank {rank} was started with different settings from rank 0 "
                            f"(rank 0 -> rank {rank}): {', '.join(diffs)}", agreed=True)


def share_state(comm, state, params, velocity):
    """Make every rank hold rank 0's ``state`` (None on the others, or on rank 0 for a
    fresh run); ``params`` and ``velocity`` (its zeros, [] without momentum) are this
    rank's arrays to fill, and a fresh run's starting values on rank 0."""
    meta = None
    if comm.rank == 0:
        if state is None:
            state = TrainState(params=params, velocity=velocity)
        meta = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
                if f.name not in ("params", "velocity")}
        meta = json.dumps({**meta, "totals": [float(t) for t in meta["totals"]]})
    # as JSON, not pickled numpy objects: ranks may run different numpy versions
    meta = json.loads(comm.bcast(meta, root=0))
    held = broadcast_params(comm, state.params if comm.rank == 0 else params)
    moving = broadcast_params(comm, state.velocity if comm.rank == 0 else velocity)
    meta["totals"] = np.asarray(meta["totals"], np.float64)
    return TrainState(params=held, velocity=moving, **meta)


def agree(comm, fn, *args):
    """Run ``fn(*args)`` on every rank; if any rank raises a CleanExit, all raise it.

    The first failing rank's error wins; it names its rank unless that is rank 0
    (which also runs the checks only rank 0 makes) or every rank said the same.
    A Stopped is not agreed on: a stop signal ended a wait on this rank (an open()
    that blocked, :meth:`distnn.stop.StopRequest.interruptible`), and other ranks
    may be blocked too, never to join a collective call; ``run_or_abort`` ends them.
    """
    try:
        result, failure = fn(*args), None
    except Stopped:
        raise
    except CleanExit as exc:
        result, failure = None, (type(exc).__name__, str(exc))
    raise_agreed(comm.allgather(failure))
    return result


def on_rank0(comm, fn, *args):
    """``fn(*args)`` on rank 0 (its writes), agreed: when it fails (an OutputError for a
    file that cannot be written), every rank ends with its error. Returns rank 0's result."""
    return comm.bcast(agree(comm, lambda: fn(*args) if comm.rank == 0 else None), root=0)


def raise_agreed(failures):
    """Raise the first rank's failure of ``failures`` (one (kind, message) per rank, None
    for no failure) as an agreed CleanExit, naming the rank unless it is rank 0 or every
    rank said the same."""
    for rank, failure in enumerate(failures):
        if failure is not None:
            kind, text = failure
            prefix = "" if rank == 0 or all(f == failure for f in failures) else f"rank {rank}: "
            raise AGREED[kind](prefix + text, agreed=True)


def check_replicas(comm, params, when):
    """Stop the run if any rank's parameters (and velocity) differ from rank 0's."""
    digests = comm.allgather(model.params_digest(params))
    if len(set(digests)) != 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"ranks {bad} hold different parameters from rank 0 {when}")
    return digests[0]


def run_or_abort(comm, prog, fn):
    """Run ``fn()`` and return the exit code; map failures to one clear line, never a hang.

    A CleanExit raised on every rank together (or in a single-rank run) is
    printed once by rank 0 and every rank returns its code. One raised on a
    single rank, or any other exception (a bug), is printed by the failing rank
    and the whole job is aborted.
    """
    try:
        fn()
        return 0
    except CleanExit as exc:
        if exc.agreed or comm.size == 1:
            if comm.rank == 0:
                print(f"{prog}: {exc.label}: {exc}", file=sys.stderr, flush=True)
            return exc.exit_code
        print(f"{prog}: {exc.label}: rank {comm.rank}: {exc}", file=sys.stderr, flush=True)
        abort(comm, exc.exit_code)
    except SystemExit as exc:  # --help
        return exc.code or 0
    except BaseException:
        text = traceback.format_exc()
        print(f"{prog}: rank {comm.rank} failed:\n{text}", file=sys.stderr, flush=True)
        if comm.size == 1:
            return EXIT_FAILURE
        abort(comm, EXIT_FAILURE)


def abort(comm, code):
    """End every rank now. The short pause lets mpirun forward this rank's last output
    (the error message) before it tears the job down."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)
    comm.Abort(code)


def finish(comm, prog, code, stop):
    """End this rank with exit ``code`` once the run's outcome is decided on every rank.

    From here on a stop signal is ignored (``stop.ignore()``): the outcome stands.
    The ranks meet once more, waiting at most FINISH_WAIT_S for each other; a rank
    whose peers are gone (a killed rank under a launcher that does not end the
    job) leaves without MPI finalisation, which would wait for them forever.
    ``MPI_Finalize`` holds the GIL, so only faulthandler's own thread can end a
    finalisation that waits for a peer lost after the meeting: with exit 1 and a
    dump of where it waited, which beats waiting forever.
    """
    stop.ignore()
    sys.stdout.flush()
    sys.stderr.flush()
    if comm.size > 1 and not all_arrive(comm, FINISH_WAIT_S):
        print(f"{prog}: warning: rank {comm.rank}: the other ranks did not reach the end "
              f"within {FINISH_WAIT_S} s; leaving without them", file=sys.stderr, flush=True)
        os._exit(code)
    faulthandler.dump_traceback_later(FINISH_WAIT_S, exit=True)  # a peer lost just now
    MPI.Finalize()
    faulthandler.cancel_dump_traceback_later()
    sys.exit(code)


def all_arrive(comm, timeout):
    """A barrier that gives up after ``timeout`` seconds; True if every rank arrived."""
    request = comm.Ibarrier()
    deadline = time.monotonic() + timeout
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
