"""The prepared MNIST file as seen by one rank: splits, epoch order, row reads.

Every rank opens the HDF5 file read-only itself. By default a rank holds the
images it may need in memory as uint8 (the full set: 60,000 x 784 B = 47 MB for
training plus 7.8 MB for test, about 55 MB per rank); with ``stream=True`` it
reads only the rows it is given, step by step. Pixels are scaled to [0, 1] in
the run's dtype when rows are handed out.
"""

from pathlib import Path

import h5py
import numpy as np

from data_prep import PrepError, schema
from distnn.errors import UserError


class Dataset:
    """Training, validation and test rows of one prepared file."""

    def __init__(self, path, train_limit=0, val_size=0, seed=0, stream=False):
        self.path = Path(path)
        try:
            sizes = schema.check(self.path)
        except PrepError as exc:
            raise UserError(str(exc)) from None
        n = sizes["train"] if not train_limit else min(train_limit, sizes["train"])
        if val_size >= n:
            raise UserError(f"--val-size {val_size} leaves no training images out of {n}")
        order = np.random.default_rng(seed).permutation(n)
        self.rows = {"train": np.sort(order[val_size:]), "val": np.sort(order[:val_size]),
                     "test": np.arange(sizes["test"])}
        self.stream = stream
        self.file = h5py.File(self.path, "r")
        self.memory = {}
        if not stream:
            for split, count in (("train", n), ("test", sizes["test"])):
                self.memory[split] = (self._read(split, "images", slice(0, count)),
                                      self._read(split, "labels", slice(0, count)))

    def close(self):
        self.file.close()

    def size(self, split):
        return len(self.rows[split])

    def epoch_order(self, epoch, seed, shuffle):
        """Positions into the training rows for one epoch: the same on every rank."""
        n = self.size("train")
        if not shuffle:
            return np.arange(n)
        return np.random.default_rng([seed, epoch]).permutation(n)

    def get(self, split, positions):
        """uint8 images (n, 784) and int64 labels for positions in a split."""
        file_rows = self.rows[split][positions]
        source = "test" if split == "test" else "train"
        if self.stream:
            order = np.argsort(file_rows, kind="stable")
            ascending = file_rows[order]
            images = np.empty((len(file_rows), 784), np.uint8)
            labels = np.empty(len(file_rows), np.uint8)
            if len(file_rows):
                images[order] = self._read(source, "images", ascending)
                labels[order] = self._read(source, "labels", ascending)
        else:
            images, labels = (a[file_rows] for a in self.memory[source])
        return images, labels.astype(np.int64)

    def _read(self, split, kind, rows):
        try:
            return self.file[f"{split}/{kind}"][rows]
        except (OSError, ValueError, KeyError) as exc:
            where = (f"rows {rows.start}-{rows.stop - 1}" if isinstance(rows, slice)
                     else f"rows {describe_rows(rows)}")
            raise UserError(f"{self.path}: cannot read /{split}/{kind} {where}: {exc}") from None


def describe_rows(rows):
    rows = np.asarray(rows)
    text = ", ".join(str(r) for r in rows[:5])
    return text + (f", ... ({len(rows)} rows)" if len(rows) > 5 else "")
