"""The trained model's file, model.h5: what ``--init`` and ``distnn.predict`` read.

Written whole (:func:`distnn.files.write_whole`): a reader or a crash
never sees half a file. Nothing in it is pickled. Read back, every attribute
and array is checked before it is used, and the arrays' sizes from their
declared shapes before any is read: a file distnn did not write is refused
with one line, never half-used.
"""

import os
from itertools import pairwise
from types import SimpleNamespace

import h5py
import numpy as np

from data_prep.schema import PIXELS, held
from distnn import activations, losses
from distnn.config import DTYPES, check_task, fmt
from distnn.errors import UserError
from distnn.files import opening, reason, write_whole

NAMES = {"activation": list(activations.ACTIVATIONS), "loss": list(losses.LOSSES),
         "dtype": list(DTYPES)}


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


def load_model(path, dtype=None, what="--model"):
    """Read the model.h5 ``path`` (``what``: the flag that named it); return (params, attrs),
    the parameters as ``dtype`` (default: the model's). A UserError names the file and
    what is wrong with it."""
    where = f"{what} {path}"
    try:
        with opening(path, what):
            f = h5py.File(path, "r")
        with f:
            attrs = read_attrs(f, where)
            cast = np.dtype(dtype or attrs["dtype"])
            check_size(where, attrs["layers"], cast)
            params = [(read_array(f, f"layers/{i}/W", (fan_in, fan_out), cast, where),
                       read_array(f, f"layers/{i}/b", (fan_out,), cast, where))
                      for i, (fan_in, fan_out) in enumerate(pairwise(attrs["layers"]))]
    except OSError as exc:
        raise UserError(f"{where}: not a readable distnn model file ({reason(exc)})") from None
    return params, attrs


def read_attrs(f, where):
    """The root attributes, of the types save_model writes, describing a network that
    distnn.train trains on MNIST (by the trainer's own rules, :func:`distnn.config.check_task`)."""
    layers = attribute(f, "layers", where)
    if not (isinstance(layers, np.ndarray) and layers.ndim == 1 and layers.dtype.kind in "iu"
            and len(layers) >= 2 and layers.min() >= 1):
        raise UserError(f"{where}: attribute layers must be a list of two or more whole "
                        f"widths of at least 1, got {layers!r}")
    attrs = {"layers": tuple(int(n) for n in layers)}
    for name, known in NAMES.items():
        value = attribute(f, name, where)
        if not isinstance(value, str):  # h5py gives a string as str, anything else as numpy
            raise UserError(f"{where}: attribute {name} must be a string, got {value!r}")
        if value not in known:
            raise UserError(f"{where}: unknown {name} {value!r} (distnn knows {', '.join(known)})")
        attrs[name] = value
    digit = attribute(f, "positive_digit", where, required=False)
    if digit is not None and not isinstance(digit, np.integer):
        raise UserError(f"{where}: attribute positive_digit must be one whole number, got {digit!r}")
    attrs["positive_digit"] = None if digit is None else int(digit)
    try:
        check_task(SimpleNamespace(**attrs))
    except UserError as exc:
        raise UserError(f"{where}: distnn.train makes no such model: {exc}") from None
    if attrs["layers"][0] != PIXELS:
        raise UserError(f"{where}: the model takes {attrs['layers'][0]} inputs, but the images "
                        f"have {PIXELS} pixels (28x28)")
    return attrs


def attribute(f, name, where, required=True):
    """A root attribute's value (None when absent and not ``required``)."""
    if name not in f.attrs:
        if required:
            raise UserError(f"{where}: has no attribute {name}; not a distnn model file")
        return None
    try:
        return f.attrs[name]
    except (OSError, TypeError, ValueError) as exc:  # a type h5py cannot give as numpy
        raise UserError(f"{where}: attribute {name} cannot be read ({exc})") from None


def check_size(where, layers, dtype):
    """Refuse layers whose parameters would not fit in this machine's memory, from their
    declared sizes: before reading anything (a sparse HDF5 array stores nothing of them)."""
    count = sum(fan_in * fan_out + fan_out for fan_in, fan_out in pairwise(layers))
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if count * dtype.itemsize > memory:
        raise UserError(f"{where}: its layers {fmt(layers)} hold {count:,} parameters "
                        f"({count * dtype.itemsize / 2**30:,.0f} GiB as {dtype}), more than "
                        f"this machine's memory ({memory / 2**30:,.0f} GiB)")


def read_array(f, name, shape, dtype, where):
    """The dataset ``/name`` as a C-ordered ``dtype`` array, after checking it is a dataset
    of real numbers of ``shape`` stored in this file, and that its values are finite."""
    node = held(where, f, name, "a model file")
    if node is None:
        raise UserError(f"{where}: has no dataset /{name}")
    if not isinstance(node, h5py.Dataset):
        raise UserError(f"{where}: /{name} is a {type(node).__name__.lower()}, not a dataset")
    if node.dtype.kind not in "fiu":
        raise UserError(f"{where}: /{name} holds {node.dtype}, not real numbers")
    if node.shape != shape:
        raise UserError(f"{where}: /{name} has shape {node.shape}, but its layers "
                        f"declare {shape}")
    array = np.ascontiguousarray(node[...], dtype)
    if not np.isfinite(array).all():
        raise UserError(f"{where}: /{name} holds NaN or infinite values (as {dtype})")
    return array
