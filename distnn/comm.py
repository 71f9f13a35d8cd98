"""The few MPI-specific pieces: agreeing on errors, checking replicas, failing fast.

A Python exception on one rank must not leave the others waiting forever in
a collective call. ``agree`` runs a check on every rank and turns any rank's
UserError into the same error everywhere; ``run_or_abort`` ends the whole job
with ``MPI.Abort`` when a rank fails on its own (the fix ``python -m mpi4py``
applies).
"""

import hashlib
import sys
import time
import traceback


from distnn.errors import CleanExit, UserError

EXIT_FAILURE = 1
ABORT_GRACE_S = 0.3


def agree(comm, fn, *args):
    """Run ``fn(*args)`` on every rank; if any rank raises UserError, all raise it.

    The first failing rank's message wins; it names its rank unless that is rank 0
    (which also runs the checks only rank 0 makes) or every rank said the same.
    """
    try:
        result, message = fn(*args), None
    except UserError as exc:
        result, message = None, str(exc)
    raise_agreed(comm.allgather(message))
    return result


def raise_agreed(messages):
    """Raise the first rank's error of ``messages`` (one per rank, None for no error) as
    an agreed UserError, naming the rank unless it is rank 0 or every rank said the same."""
    for rank, text in enumerate(messages):
        if text is not None:
            prefix = "" if rank == 0 or all(m == text for m in messages) else f"rank {rank}: "
            raise UserError(prefix + text, agreed=True)


def params_hash(params):
    """A running SHA-256 of W0, b0, W1, b1, ... as C-order bytes in the run's dtype."""
    h = hashlib.sha256()
    for W, b in params:
        h.update(W.tobytes())
        h.update(b.tobytes())
    return h


def params_digest(params):
    """The hex SHA-256 of the parameters (:func:`params_hash`)."""
    return params_hash(params).hexdigest()


def check_replicas(comm, params, when):
    """Stop the run if any rank's parameters differ from rank 0's."""
    digests = comm.allgather(params_digest(params))
    if len(set(digests)) != 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"ranks {bad} hold different parameters from rank 0 {when}")
    return digests[0]


def run_or_abort(comm, prog, fn):
    """Run ``fn()``; map failures to one clear line and an exit code, never a hang.

    A CleanExit raised on every rank together (or in a single-rank run) is
    printed once by rank 0 and every rank exits with its code. One raised on a
    single rank, or any other exception (a bug), is printed by the failing rank
    and the whole job is aborted.
    """
    try:
        return fn()
    except CleanExit as exc:
        if exc.agreed or comm.size == 1:
            if comm.rank == 0:
                print(f"{prog}: {exc.label}: {exc}", file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)
        print(f"{prog}: {exc.label}: rank {comm.rank}: {exc}", file=sys.stderr, flush=True)
        abort(comm, exc.exit_code)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        text = traceback.format_exc()
        print(f"{prog}: rank {comm.rank} failed:\n{text}", file=sys.stderr, flush=True)
        if comm.size == 1:
            sys.exit(EXIT_FAILURE)
        abort(comm, EXIT_FAILURE)


def abort(comm, code):
    """End every rank now. The short pause lets mpirun forward this rank's last output
    (the error message) before it tears the job down."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)
    comm.Abort(code)
