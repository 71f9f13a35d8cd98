"""Ways a run ends early on purpose: one line on rank 0 and a documented exit code.

Exit codes: 0 finished; 1 crashed (a bug or a lost rank; traceback shown);
2 bad input or settings (flags, the data file, the output folder); 3 training
diverged; 74 an output could not be written during the run (disk full, I/O
error); 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint (resume with
--resume; job scripts requeue on it); 130 stopped by Ctrl-C (SIGINT) and 129 by
SIGHUP (a closed terminal or ssh session), likewise after a checkpoint, or at
once without one on a second Ctrl-C (the shell's 128 + the signal's number).
"""

import argparse
import signal
import sys

TRAIN = "distnn.train"  # the trainer's name in its messages
INTERRUPTED = 128 + signal.SIGINT  # 130: Ctrl-C, the shell's convention
HUNG_UP = 128 + signal.SIGHUP  # 129: the terminal went away


def warn(message):
    """One warning line of the trainer's on stderr: the run goes on."""
    print(f"{TRAIN}: warning: {message}", file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one-line UserErrors (so all ranks can agree,
    and every tool reports them like any other bad input)."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def cli(prog, action, errors):
    """Print ``action()``'s result and return 0; an ``errors`` exception becomes one
    line on stderr and exit code 2 (the tools besides the trainer), or 74 when an output
    did not fit on the disk (:class:`NoRoom`); Ctrl-C is one line and
    exit code 130 (their outputs are written whole or not at all). ``action`` parses
    its flags itself, so a mistake in them (a UserError from :class:`Parser`) is one
    line too."""
    try:
        print(action())
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, NoRoom) else 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return INTERRUPTED
    return 0


class CleanExit(Exception):
    """Ends the run with one message line and ``exit_code``, never a traceback.

    ``agreed`` is True when every rank raised it together (so no rank is left
    waiting in a collective call).
    """
    exit_code = 2
    label = "error"

    def __init__(self, message, agreed=False):
        super().__init__(message)
        self.agreed = agreed


class UserError(CleanExit):
    """Bad input or settings."""
    exit_code = 2


class Diverged(CleanExit):
    """The loss or gradients became NaN or infinite."""
    exit_code = 3


class OutputError(CleanExit):
    """Writing an output failed during the run; the last good checkpoint is kept."""
    exit_code = 74


class NoRoom(OutputError):
    """An output did not fit: the disk or the quota is full (exit 74 for every tool; for
    the tools, any other failure to write is a bad output path, exit 2)."""


class Stopped(CleanExit):
    """A stop signal (SIGTERM, SIGUSR1) arrived; a checkpoint was written, or, in start-up,
    nothing was."""
    exit_code = 75
    label = "stopped"


class Interrupted(Stopped):
    """Stopped by Ctrl-C (SIGINT)."""
    exit_code = INTERRUPTED


class HungUp(Stopped):
    """Stopped by SIGHUP (the terminal or ssh session closed)."""
    exit_code = HUNG_UP


def stopped(signum, message, agreed=False):
    """The Stopped exception for stop signal ``signum``: its class carries the exit code
    (a job script requeues on 75, never on a user's Ctrl-C or hang-up)."""
    kind = {signal.SIGINT: Interrupted, signal.SIGHUP: HungUp}.get(signum, Stopped)
    return kind(message, agreed=agreed)
