"""Checkpoints: HDF5 snapshots holding everything needed to continue a run exactly.

A checkpoint is taken at a step boundary and holds the run's
:class:`distnn.state.TrainState` (parameters, the momentum's velocity, the
global step, the epoch and the steps done in it, the epoch's running
statistic sums, the metrics history, the seconds trained), the
configuration and the data file's fingerprint: all a run needs to resume
exactly, on any number of ranks.

Files are ``<out>/checkpoints/ckpt-<step>.h5``, written by rank 0 under a
temporary name, fsync'd, renamed and the folder fsync'd
(:func:`distnn.files.atomic_write`): a crash at any moment
leaves the previous checkpoint intact. Each file carries a SHA-256 of its
contents, checked on load, and nothing in it is pickled. Only a regular file
is opened (never a symlink or a FIFO placed in the folder), and what it holds
is handed over with the types it was stored with, for the resuming run to
check against its own settings (:func:`distnn.state.misfit`).
"""

import json
import os
import re
from contextlib import suppress
from pathlib import Path

import h5py
import numpy as np

from distnn.files import atomic_write, opening, writing
from distnn.model import params_hash
from distnn.state import TrainState

FORMAT = "distnn-checkpoint"
VERSION = 3
# why each older version cannot be continued
OLDER = {1: "its arithmetic gives other bits than this release's",
         2: "it has no optimizer state (momentum's velocity) and its update rounds otherwise"}
NAME = re.compile(r"^ckpt-(\d{9})\.h5$")
SCALARS = ("step", "epoch", "position", "seen", "elapsed_s")  # the state's attributes


class CheckpointError(Exception):
    """A checkpoint file is unreadable, incomplete or fails its checksum."""


def digest(state, config_json, data_fingerprint):
    """SHA-256 over every value a checkpoint stores, in a fixed order."""
    h = params_hash(state.params + state.velocity)
    h.update(np.asarray(state.totals, np.float64).tobytes())
    meta = {"step": state.step, "epoch": state.epoch, "position": state.position,
            "seen": state.seen, "history": state.history, "elapsed_s": state.elapsed_s,
            "config": config_json,
            "data": data_fingerprint}
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def save(folder, state, config_json, data_fingerprint, keep):
    """Write a checkpoint for ``state`` atomically; keep only the newest ``keep``.

    A failed write (OutputError naming the file) leaves the older checkpoints as they were.
    """
    folder = Path(folder)
    path = folder / f"ckpt-{state.step:09d}.h5"

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for i, (W, b) in enumerate(state.params):
                f[f"params/{i}/W"] = W
                f[f"params/{i}/b"] = b
            for i, (vW, vb) in enumerate(state.velocity):
                f[f"velocity/{i}/W"] = vW
                f[f"velocity/{i}/b"] = vb
            f["totals"] = np.asarray(state.totals, np.float64)
            f.attrs.update({"format": FORMAT, "version": VERSION, "step": state.step,
                            "epoch": state.epoch, "position": state.position,
                            "seen": state.seen, "history": json.dumps(state.history),
                            "elapsed_s": state.elapsed_s,
                            "config": config_json, "data": data_fingerprint,
                            "sha256": digest(state, config_json, data_fingerprint)})
    with writing(path):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write, follow=False)
        prune(folder, keep)
    return path


def prune(folder, keep):
    """Remove all but the newest ``keep`` checkpoints of ``folder``, by name inside the
    folder opened once (so never in another folder a link swapped in for it names)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in sorted(n for n in os.listdir(fd) if NAME.match(n))[:-keep]:  # by step
            with suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def load(path):
    """Read and verify one checkpoint; return (state, config_json, data_fingerprint), the
    state's counters as stored (an int is an int only if it was one)."""
    try:
        with opening(path, "checkpoint", follow=False, error=CheckpointError):
            f = h5py.File(path, "r")
        with f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a distnn checkpoint")
            version = f.attrs.get("version")
            if version != VERSION:
                why = OLDER.get(version, "it comes from another distnn release")
                raise CheckpointError(f"{path}: checkpoint version {version} cannot be "
                                      f"continued: {why}; this release continues version "
                                      f"{VERSION} only (start the run afresh)")
            params, velocity = (arrays(f, group) for group in ("params", "velocity"))
            state = TrainState(params=params, velocity=velocity, totals=f["totals"][...],
                               history=json.loads(f.attrs["history"]),
                               **{name: python_value(f.attrs[name]) for name in SCALARS})
            config_json, data = str(f.attrs["config"]), str(f.attrs["data"])
            stored = str(f.attrs["sha256"])
        verified = digest(state, config_json, data) == stored
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable or incomplete ({exc})") from None
    if not verified:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
    return state, config_json, data


def python_value(value):
    """An attribute's value as save stored it: a numpy scalar as its Python int, float or
    bool; a string or an array as it is."""
    return value.item() if isinstance(value, np.generic) else value


def arrays(f, group):
    """[(W, b), ...] stored under ``group`` of an open checkpoint ([] when absent)."""
    n_layers = len(f[group]) if group in f else 0
    return [(f[f"{group}/{i}/W"][...], f[f"{group}/{i}/b"][...]) for i in range(n_layers)]


def listing(folder):
    """(step, path) of the checkpoint files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def load_latest(folder, warn, accept=lambda path, state, config_json, data: None):
    """The newest checkpoint that verifies and that ``accept(path, state, config_json,
    data)`` takes, skipping, with ``warn(message)``, corrupt ones, entries that are not
    regular files, and those ``accept`` rejects with a CheckpointError (the resuming run's
    check that a checkpoint fits it); returns (path, state, config_json, data).

    Returns None when there is no checkpoint at all; raises CheckpointError when
    there are some but none is taken.
    """
    candidates = listing(folder)
    for _, path in reversed(candidates):
        try:
            found = (path, *load(path))
            accept(*found)
            return found
        except CheckpointError as exc:
            warn(f"skipping {exc}")
    if candidates:
        raise CheckpointError(f"{folder}: no valid checkpoint among {len(candidates)} files")
    return None
