#!/bin/bash
# Train on this workstation with N ranks:  launch/local.sh -n 4 [distnn.train flags...]
#
# Uses the project's .venv if there is one (else python3 on PATH) and the MPI
# beside that Python (MPICH, Open MPI or Intel MPI: python -m distnn.launcher
# starts the ranks the way each needs), with one BLAS thread per rank.
# Exit code 75 (SIGTERM/SIGUSR1), 130 (Ctrl-C) or 129 (SIGHUP) means a stop signal
# arrived and a checkpoint was written: run the same command again with --resume to continue.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
ranks=2
if [ "${1:-}" = "-n" ]; then
    ranks=${2:?usage: launch/local.sh -n RANKS [distnn.train flags...]}
    shift 2
fi
python=${DISTNN_PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$here/.venv/bin/python" ]; then python=$here/.venv/bin/python; else python=$(command -v python3); fi
fi
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
exec "$python" -m distnn.launcher -n "$ranks" "$python" -m distnn.train "$@"
