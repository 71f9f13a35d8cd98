"""What a run leaves in ``--out``: model.h5, metrics.jsonl, summary.json.

model.h5 and summary.json are written under a temporary name, fsync'd and
renamed (and the folder fsync'd), so a reader or a crash never sees half a
file. metrics.jsonl grows by one flushed line per epoch; a resumed run rewrites
it atomically from its checkpoint's history.
"""

import json
import os
from pathlib import Path

import h5py
import numpy as np

from data_prep.files import atomic_write
from distnn.errors import UserError


def write_json(path, obj):
    def write(tmp):
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    atomic_write(path, write)


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
    atomic_write(path, write)


def load_model(path, dtype=None):
    """Read a model.h5; return (params, attrs). UserError names the file and problem."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {"layers": tuple(int(n) for n in f.attrs["layers"]),
                     "activation": str(f.attrs["activation"]), "loss": str(f.attrs["loss"]),
                     "dtype": str(f.attrs["dtype"]),
                     "positive_digit": int(f.attrs["positive_digit"])
                     if "positive_digit" in f.attrs else None}
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


class MetricsLog:
    """One JSON object per epoch in metrics.jsonl, each line flushed and fsync'd."""

    def __init__(self, path):
        self.path = Path(path)

    def rewrite(self, records):
        """Replace the file with ``records`` (a resumed run drops lines past its checkpoint)."""
        def write(tmp):
            Path(tmp).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        atomic_write(self.path, write)

    def append(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
