"""Progress on rank 0 while training: a bar on a terminal, plain lines in a log file.

In a plain process on a terminal (and with tqdm installed:
``pip install 'distnn[progress]'``) a tqdm bar shows the step, the loss and
samples/s. Otherwise (a batch job's log file, a pipe, any MPI launcher) a plain
line is printed every ``log_every`` steps, with no carriage returns or escape
codes. ``quiet`` turns both off.

Whether rank 0's stdout is a terminal says little under a launcher: Open MPI's
``mpirun`` gives rank 0 a pseudo-terminal even when its own output goes to a
batch log, where a bar's carriage returns would hide every line. So a bar is
drawn only by a process that no launcher started (``--progress auto``);
``--progress bar`` or ``lines`` decide it instead.
"""

import os
import sys
import time

MODES = ("auto", "bar", "lines")
# set in every rank's environment by MPICH's and Intel MPI's hydra, Open MPI's prterun
# and Slurm's srun
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_ID")


def bar_wanted(mode, stream, environ=os.environ):
    """Whether ``mode`` (:data:`MODES`) draws a bar on ``stream`` rather than plain lines."""
    if mode != "auto":
        return mode == "bar"
    return stream.isatty() and not any(name in environ for name in LAUNCHER_VARIABLES)


class Progress:
    """Per-step progress for one run; only rank 0 creates an enabled one."""

    def __init__(self, total_steps, log_every=100, quiet=False, stream=None, enabled=True, start=0,
                 mode="auto"):
        self.stream = stream or sys.stdout
        self.total = total_steps
        self.log_every = log_every
        self.enabled = enabled and not quiet
        self.bar = None
        self.window_start, self.window_samples = time.perf_counter(), 0
        if self.enabled and bar_wanted(mode, self.stream):
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total_steps, initial=start, file=self.stream, unit="step",
                                dynamic_ncols=True, leave=False)

    def update(self, step, epoch, loss, samples):
        """Record one finished step (``step`` counts from 1 over the whole run)."""
        if not self.enabled:
            return
        self.window_samples += samples
        if self.bar is not None:
            elapsed = time.perf_counter() - self.window_start
            if elapsed > 0.5 or step == self.total:
                self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}",
                                     samples_s=f"{self.window_samples / elapsed:.0f}", refresh=False)
                self.window_start, self.window_samples = time.perf_counter(), 0
            self.bar.update(step - self.bar.n)  # tqdm redraws at most every 0.1 s
        elif self.log_every and step % self.log_every == 0:
            elapsed = time.perf_counter() - self.window_start
            print(f"step {step:6d}/{self.total}  epoch {epoch}  loss {loss:.4f}  "
                  f"{self.window_samples / elapsed:.0f} samples/s", file=self.stream, flush=True)
            self.window_start, self.window_samples = time.perf_counter(), 0

    def write(self, line):
        """Print a line (an epoch summary) without breaking the bar; restarts the rate window."""
        self.window_start, self.window_samples = time.perf_counter(), 0
        if self.bar is not None:
            self.bar.clear()
            print(line, file=self.stream, flush=True)
            self.bar.refresh()
        else:
            print(line, file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
