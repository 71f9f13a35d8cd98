"""The trained model's file, model.h5: what ``--init`` and ``distnn.predict`` read.

Written whole (:func:`distnn.files.write_whole`): a reader or a crash
never sees half a file. Nothing in it is pickled.
"""

import h5py
import numpy as np

from distnn import activations, losses
from distnn.config import DTYPES
from distnn.errors import UserError
from distnn.files import write_whole


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
