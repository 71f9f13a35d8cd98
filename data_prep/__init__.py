"""Prepare MNIST (IDX or CSV) into distnn's HDF5 file, schema version 2 (:mod:`data_prep.schema`).

The four canonical MNIST IDX files are bundled in ``data_prep/mnist`` so a
fresh machine (or a compute node without internet) can prepare the data
offline: ``python -m data_prep`` writes ``data/mnist.h5``.
"""

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "mnist"

# (split, kind) -> canonical IDX file name, without ".gz"
IDX_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
