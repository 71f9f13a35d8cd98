"""Claiming the run folder (``--out``): owned by one run at a time, never left half-made.

Rank 0 claims the folder before anything is written to it:

- the default ``runs/<timestamp>`` is made with an exclusive ``mkdir``, so two
  runs started in the same second get ``runs/<timestamp>`` and
  ``runs/<timestamp>-2``;
- a lock on ``<out>/.lock`` (``flock``, released by the kernel when the process
  ends, however it ends) is held for the whole run: a second run on the same
  folder is refused with one line naming the run that holds it;
- a folder whose fixed entries (the lock, config, metrics, model, summary, the
  checkpoints folder) are symlinks or not what distnn makes there is refused:
  on a shared file system anyone who can write into the folder could otherwise
  make the run write, lock or delete files elsewhere with its owner's rights;
- a folder that already holds a run is refused unless ``--resume``;
- temporary files a killed run left behind (``.model.h5.*.tmp``, ...) are
  removed, safely, since the lock shows no other run writes there;
- the folders the run made itself (``--out`` and any parents it had to make)
  are removed again if the run fails before its first step
  (:meth:`RunFolder.discard`).
"""

import datetime
import errno
import fcntl
import os
import shutil
import socket
import stat
from pathlib import Path

from distnn.errors import UserError, warn
from distnn.files import KINDS, reason
from distnn.rundir import CHECKPOINTS, CONFIG, LOCK, METRICS, MODEL, SUMMARY, started

# temporary files of distnn.train's own writes (files.atomic_write names them
# .<name>.<random>.tmp); other programs' temporary files in the folder are left alone
LEFTOVERS = [f".{name}.*.tmp" for name in (MODEL, SUMMARY, CONFIG, METRICS)] + \
    [f"{CHECKPOINTS}/.ckpt-*.h5.*.tmp"]
SHOWN_PATH = 200  # longer paths are shortened in messages


class RunFolder:
    """A claimed run folder: ``path``, the outermost folder this run ``created`` for it
    (``path`` or a parent; None when ``path`` existed), and its lock."""

    def __init__(self, path, created, lock_fd):
        self.path, self.created, self.lock_fd = path, created, lock_fd

    def release(self):
        """Give up the lock (the process's end does the same)."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def discard(self):
        """Remove the folder if this run made it and holds it (the run failed before it
        began, so everything in it is this run's own), then release it."""
        if self.created and self.lock_fd is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        self.release()


def claim(out, resume):
    """Claim ``out`` (or a new ``runs/<timestamp>`` when empty) for this run; UserError
    (one line naming the folder) when it cannot be used."""
    path = Path(out) if out else unique_default()
    folder = RunFolder(path, make(path) if out else path, None)
    try:
        check_entries(path)
        folder.lock_fd = lock(path)
        if started(path) and not resume:
            raise UserError(f"--out {shown(path)}: already holds a run; add --resume to continue "
                            "it or choose another folder")
        sign(folder.lock_fd, path)
        for pattern in LEFTOVERS:
            for stale in path.glob(pattern):
                stale.unlink(missing_ok=True)
    except BaseException:
        folder.discard()
        raise
    return folder


def make(path):
    """Create ``path`` and the parents it lacks; return the outermost folder this call
    created (None if ``path`` was a folder already). On failure nothing it made is left."""
    made = None
    try:
        for folder in [p for p in (path, *path.parents) if not p.exists()][::-1]:
            try:
                folder.mkdir()
            except FileExistsError:  # made by another run just now, or not a folder
                if not folder.is_dir():
                    raise UserError(f"--out {shown(path)}: {shown(folder)} exists and is not "
                                    "a folder") from None
                continue
            made = made or folder
        if not path.is_dir():
            raise UserError(f"--out {shown(path)}: exists and is not a folder")
    except (UserError, OSError) as exc:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(exc, UserError):
            raise
        raise UserError(f"--out {shown(path)}: cannot create it: {reason(exc)}") from None
    return made


def check_entries(path):
    """UserError unless each fixed entry of the run folder ``path`` is absent or what
    distnn makes there (a regular file; ``checkpoints`` a folder): never a symlink,
    which would make the run write, lock or delete elsewhere, nor a FIFO, which would
    block it."""
    for name in (LOCK, CONFIG, METRICS, MODEL, SUMMARY, CHECKPOINTS):
        try:
            mode = os.lstat(path / name).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UserError(f"--out {shown(path)}: cannot read {name}: {reason(exc)}") from None
        wanted = stat.S_ISDIR if name == CHECKPOINTS else stat.S_ISREG
        if not wanted(mode):
            kind = KINDS.get(stat.S_IFMT(mode), "not a regular file")
            made = "a folder" if name == CHECKPOINTS else "a regular file"
            raise UserError(f"--out {shown(path)}: {name} is in the way: it is {kind}, not "
                            f"{made} (distnn never follows a link placed in a run folder); "
                            "remove it or choose another folder")


def unique_default(parent=Path("runs"), now=None):
    """A new folder ``runs/<timestamp>`` (of ``now``), or ``runs/<timestamp>-<n>`` if that exists."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    make(parent)
    for n in range(1, 1000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()  # exclusive: one run wins each name
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"{shown(path)}: cannot create it: {reason(exc)}") from None
    raise UserError(f"{parent}: 999 runs started in the second {stamp}; use --out")


def lock(path):
    """An open descriptor of ``path/.lock`` holding an exclusive lock, or UserError when
    another run holds it. A file system without locks gets a warning, not a refusal."""
    target = path / LOCK
    try:  # never through a symlink, never blocked by a FIFO swapped in since the check
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise UserError(f"--out {shown(path)}: cannot write there: {reason(exc)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"--out {shown(path)}: {LOCK} is in the way: it is not a regular file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
            os.close(fd)
            raise UserError(f"--out {shown(path)}: in use by {holder}; wait for it to end or "
                            "choose another folder") from None
        warn(f"--out {shown(path)}: cannot lock it ({reason(exc)}); make sure no other run "
             "uses this folder")
    return fd


def sign(fd, path):
    """Name this run in the lock file, for the message a second run gets."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"run of pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n".encode(), 0)
    except OSError as exc:
        raise UserError(f"--out {shown(path)}: cannot write there: {reason(exc)}") from None


def shown(path):
    """``path`` for a message, shortened in the middle when it is very long."""
    text = str(path)
    if len(text) <= SHOWN_PATH:
        return text
    return f"{text[:100]}...{text[-60:]} ({len(text)} characters)"
