"""What a run leaves in ``--out``: model.h5, metrics.jsonl, summary.json.

model.h5 and summary.json are written under a temporary name, fsync'd and
renamed (and the folder fsync'd), so a reader or a crash never sees half a
file. metrics.jsonl grows by one whole, fsync'd line per epoch (a line that
cannot be written whole is cut off again); a resumed run rewrites it
atomically from its checkpoint's history. A write that fails (a full disk, an
I/O error) raises an OutputError naming the file.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from data_prep.files import atomic_write, reason
from distnn import activations, losses
from distnn.config import DTYPES
from distnn.errors import OutputError, UserError


@contextmanager
def writing(path):
    """Turn a failure to write ``path`` into an OutputError naming it."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {reason(exc)}") from None


def write_whole(path, write):
    """``data_prep.files.atomic_write`` for an output: a failure is an OutputError naming it."""
    with writing(path):
        atomic_write(path, write)


def write_json(path, obj):
    def write(tmp):
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    write_whole(path, write)


def save_model(path, params, layers, activation, loss, positive_digit=None):
    """``/layers/{i}/W`` and ``/layers/{i}/b``; attributes layers, activation, loss, dtype,
    and positive_digit for a one-against-the-rest model."""
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["layers"] = np.asarray(layers, dtype=np.int64)
            f.attrs["activation"] = activation
            f.attrs["loss"] = loss
            if positive_digit is not None:
                f.attrs["positive_digit"] = int(positive_digit)
            f.attrs["dtype"] = str(params[0][0].dtype)
            for i, (W, b) in enumerate(params):
                f[f"layers/{i}/W"] = W
                f[f"layers/{i}/b"] = b
    write_whole(path, write)


def load_model(path, dtype=None):
    """Read a model.h5; return (params, attrs). UserError names the file and problem."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {"layers": tuple(int(n) for n in f.attrs["layers"]),
                     "activation": str(f.attrs["activation"]), "loss": str(f.attrs["loss"]),
                     "dtype": str(f.attrs["dtype"]),
                     "positive_digit": int(f.attrs["positive_digit"])
                     if "positive_digit" in f.attrs else None}
            check_model_attrs(path, attrs)
            params = []
            for i in range(len(attrs["layers"]) - 1):
                W = f[f"layers/{i}/W"][...]
                b = f[f"layers/{i}/b"][...]
                if W.shape != tuple(attrs["layers"][i:i + 2]) or b.shape != (W.shape[1],):
                    raise UserError(f"{path}: layer {i} has W {W.shape} and b {b.shape}, "
                                    f"which do not match its layers {attrs['layers']}")
                cast = np.dtype(dtype or attrs["dtype"])
                params.append((np.ascontiguousarray(W, cast), np.ascontiguousarray(b, cast)))
    except (OSError, KeyError) as exc:
        raise UserError(f"{path}: not a readable distnn model file ({exc})") from None
    return params, attrs


def check_model_attrs(path, attrs):
    """UserError unless the model's activation, loss and dtype are ones distnn computes."""
    known = {"activation": list(activations.ACTIVATIONS), "loss": list(losses.LOSSES),
             "dtype": list(DTYPES)}
    for key, names in known.items():
        if attrs[key] not in names:
            raise UserError(f"{path}: unknown {key} {attrs[key]!r} (distnn knows "
                            f"{', '.join(names)})")
    if len(attrs["layers"]) < 2 or min(attrs["layers"]) < 1:
        raise UserError(f"{path}: layers {attrs['layers']} are not a network")


class MetricsLog:
    """One JSON object per epoch in metrics.jsonl, each line flushed and fsync'd."""

    def __init__(self, path):
        self.path = Path(path)

    def rewrite(self, records):
        """Replace the file with ``records`` (a resumed run drops lines past its checkpoint)."""
        def write(tmp):
            Path(tmp).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        write_whole(self.path, write)

    def append(self, record):
        """Add one line, whole or not at all."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with writing(self.path):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                size = os.fstat(fd).st_size
                try:
                    written = 0
                    while written < len(line):
                        written += os.write(fd, line[written:])
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
