"""Ways a run ends early on purpose: one line on rank 0 and a documented exit code.

Exit codes: 0 finished; 1 crashed (a bug or a lost rank; traceback shown);
2 bad input or settings (flags, the data file, the output folder); 3 training
diverged; 74 an output could not be written during the run (disk full, I/O
error); 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint (resume with
--resume).
"""

import argparse
import sys

TRAIN = "distnn.train"  # the trainer's name in its messages
INTERRUPTED = 130  # a tool ended by Ctrl-C (SIGINT): the shell's convention


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
    line on stderr and exit code 2 (the tools besides the trainer); Ctrl-C is one line and
    exit code 130 (their outputs are written whole or not at all). ``action`` parses
    its flags itself, so a mistake in them (a UserError from :class:`Parser`) is one
    line too."""
    try:
        print(action())
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
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


class Stopped(CleanExit):
    """A stop signal arrived; a checkpoint was written."""
    exit_code = 75
    label = "stopped"
