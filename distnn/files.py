"""Files that appear whole or not at all, and inputs that cannot block or lead elsewhere.

A run's outputs, its checkpoints, the prepared data file, plots and predictions
are written through :func:`atomic_write`: built in memory, written into a new
file (``O_EXCL``: never through a symlink placed there), fsync'd and renamed
over the name (a rename replaces a symlink, never its target). A full disk is
then one ``OSError`` from ``os.write``, whatever library built the bytes: HDF5
never sees the disk, so it cannot fail, or crash, half way through closing.

Inputs are checked with :func:`regular_file` before they are opened (a FIFO or
a device would block ``open()`` or ``read()`` for ever), and opened inside
:func:`opening`, where a stop signal ends an ``open()`` that blocks anyway.
"""

import errno
import io
import json
import os
import secrets
import stat
from contextlib import contextmanager, suppress
from pathlib import Path

from distnn.errors import NoRoom, OutputError, UserError
from distnn.stop import REQUEST

NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # writes that fail for the disk, not the path
KINDS = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
         stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFLNK: "a symbolic link"}


def atomic_write(path, write, follow=True):
    """Call ``write(buffer)`` on an in-memory binary file (``io.BytesIO``: h5py, matplotlib
    and gzip write into it as into a path), then put its bytes at ``path`` whole: a new
    temporary file beside it, fsync'd, renamed to ``path`` and the folder fsync'd, all
    relative to the folder opened once. A reader or a crash never sees half a file; on
    any error the temporary file is removed and ``path`` is as it was. ``follow=False``:
    the folder itself must not be a symlink (a run folder's ``checkpoints``)."""
    path = Path(path)
    buffer = io.BytesIO()
    write(buffer)
    content = buffer.getbuffer()
    try:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | (0 if follow else os.O_NOFOLLOW))
    except OSError as exc:  # name the file asked for
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    tmp = f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666,
                     dir_fd=folder)  # the umask applies, as for any new file
        try:
            written = 0
            while written < len(content):
                written += os.write(fd, content[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        os.fsync(folder)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp, dir_fd=folder)
        raise
    finally:
        content.release()
        os.close(folder)


@contextmanager
def writing(path):
    """Turn a failure to write ``path`` into an OutputError naming it (a NoRoom when the
    disk is full)."""
    try:
        yield
    except OSError as exc:
        kind = NoRoom if exc.errno in NO_ROOM else OutputError
        raise kind(f"cannot write {path}: {reason(exc)}") from None


def write_whole(path, write):
    """:func:`atomic_write` for an output: a failure is an OutputError naming the file."""
    with writing(path):
        atomic_write(path, write)


def write_json(path, obj):
    """``obj`` as indented, key-sorted JSON, written whole."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_whole(path, lambda f: f.write(text.encode()))


def regular_file(path, what, follow=True, error=UserError):
    """Raise ``error`` (one line: ``what``, the path, what it is instead) unless ``path``
    is a regular file; check this before opening an input, so a FIFO or a device never
    blocks the process. ``follow=False`` refuses a symlink too (files in a run folder,
    which someone else may be able to write to). A missing file passes: the opener
    reports it in its own words."""
    try:
        mode = (os.stat if follow else os.lstat)(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"{what} {path}: {reason(exc)}") from None
    if not stat.S_ISREG(mode):
        kind = KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise error(f"{what} {path}: is {kind}, not a regular file")


@contextmanager
def opening(path, what, follow=True, error=UserError):
    """Open the input ``path`` inside this: it must be a regular file
    (:func:`regular_file`), and should it become a FIFO after that check, a stop signal
    still ends the blocked ``open()`` (:meth:`distnn.stop.StopRequest.interruptible`)."""
    regular_file(path, what, follow, error)
    with REQUEST.interruptible(f"{what} {path}"):
        yield


def reason(exc):
    """Why an OSError happened, in one line: the system's words for its errno (HDF5's
    own messages run to several lines), else the first line of its text."""
    if exc.errno:
        return os.strerror(exc.errno)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
