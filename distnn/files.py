"""Files that appear whole or not at all: a run's outputs, its checkpoints, the prepared
data file, plots and predictions are written through :func:`atomic_write`."""

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from distnn.errors import OutputError


def atomic_write(path, write):
    """Call ``write(tmp)`` on a new temporary file beside ``path``, fsync it, give it the
    usual permissions, rename it to ``path`` and fsync the folder, so a reader or a
    crash never sees half a file; on any error the temporary file is removed."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def writing(path):
    """Turn a failure to write ``path`` into an OutputError naming it."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {reason(exc)}") from None


def write_whole(path, write):
    """:func:`atomic_write` for an output: a failure is an OutputError naming the file."""
    with writing(path):
        atomic_write(path, write)


def write_json(path, obj):
    """``obj`` as indented, key-sorted JSON, written whole."""
    def write(tmp):
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    write_whole(path, write)


def reason(exc):
    """Why an OSError happened, in one line: the system's words for its errno (HDF5's
    own messages run to several lines), else the first line of its text."""
    if exc.errno:
        return os.strerror(exc.errno)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fsync_dir(folder):
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
