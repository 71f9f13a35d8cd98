"""The prepared MNIST file as seen by one rank: splits, epoch order, row reads.

Every rank opens the HDF5 file read-only itself. By default a rank holds the
images it may need in memory as uint8 (the full set: 60,000 x 784 B = 47 MB for
training plus 7.8 MB for test, about 55 MB per rank); with ``stream=True`` it
reads only the rows it is given, step by step. Rows are handed out as uint8
pixels; the trainer scales them. A read that fails (a damaged chunk fails its
Fletcher-32 checksum) raises a UserError naming the file and the rows.
"""

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from data_prep import PrepError, schema
from distnn.errors import UserError

READ_ROWS = 4096  # rows per read when loading into memory


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
        self.fingerprint = fingerprint(self.file)
        self.memory = {}
        if not stream:
            for split, count in (("train", n), ("test", sizes["test"])):
                self.memory[split] = (self._load(split, "images", count),
                                      self._load(split, "labels", count))
                self._check_labels(split, self.memory[split][1], np.arange(count))
            # which pixels are non-zero in each training row, 98 bytes a row
            self.nonzero_bits = np.packbits(self.memory["train"][0] != 0, axis=1)

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

    def nonzero_columns(self, positions):
        """Pixel columns non-zero in any of these training rows, without reading them
        again (None when streaming: the rows are not all on this rank)."""
        if self.stream:
            return None
        union = np.bitwise_or.reduce(self.nonzero_bits[self.rows["train"][positions]], axis=0)
        return np.flatnonzero(np.unpackbits(union)[:784])

    def get(self, split, positions):
        """uint8 images (n, 784) and int64 labels for positions in a split."""
        file_rows = self.rows[split][positions]
        source = "test" if split == "test" else "train"
        if not self.stream:
            images, labels = (a[file_rows] for a in self.memory[source])
            return images, labels.astype(np.int64)
        order = np.argsort(file_rows, kind="stable")
        ascending = file_rows[order]
        images = np.empty((len(file_rows), 784), np.uint8)
        labels = np.empty(len(file_rows), np.uint8)
        if len(file_rows):
            images[order] = self._read_rows(source, "images", ascending)
            labels[order] = self._read_rows(source, "labels", ascending)
            self._check_labels(source, labels[order], ascending)
        return images, labels.astype(np.int64)

    def _check_labels(self, split, labels, rows):
        bad = np.flatnonzero(labels > 9)
        if bad.size:
            raise UserError(f"{self.path}: /{split}/labels row {int(rows[bad[0]])} holds label "
                            f"{int(labels[bad[0]])}, outside 0-9")

    def _load(self, split, kind, count):
        """Rows 0..count-1 of a dataset, read piece by piece."""
        dataset = self.file[f"{split}/{kind}"]
        pieces = []
        for lo in range(0, count, READ_ROWS):
            hi = min(lo + READ_ROWS, count)
            try:
                pieces.append(dataset[lo:hi])
            except (OSError, ValueError):
                self._locate_bad_chunk(dataset, lo, hi)
        return np.concatenate(pieces) if pieces else dataset[0:0]

    def _locate_bad_chunk(self, dataset, lo, hi):
        """Raise UserError naming the first unreadable chunk of rows in [lo, hi)."""
        step = dataset.chunks[0] if dataset.chunks else hi - lo
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            try:
                dataset[start:stop]
            except (OSError, ValueError) as exc:
                raise UserError(f"{self.path}: cannot read {dataset.name} rows "
                                f"{start}-{stop - 1}: {short(exc)}") from None
        raise UserError(f"{self.path}: cannot read {dataset.name} rows {lo}-{hi - 1}")

    def _read_rows(self, split, kind, rows):
        """Given rows (ascending), read chunk by chunk: one contiguous slice per chunk
        holding any of them (far faster than HDF5's selection of scattered rows).
        On failure, name the file and the rows of the chunk that cannot be read."""
        dataset = self.file[f"{split}/{kind}"]
        height = dataset.chunks[0] if dataset.chunks else len(rows) or 1
        out = np.empty((len(rows), *dataset.shape[1:]), dataset.dtype)
        chunk_of = rows // height
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        for group in np.split(np.arange(len(rows)), bounds):
            first = int(chunk_of[group[0]]) * height
            try:
                block = dataset[first:first + height]
            except (OSError, ValueError) as exc:
                raise UserError(f"{self.path}: cannot read {dataset.name} rows "
                                f"{describe_rows(rows[group])}: {short(exc)}") from None
            out[group] = block[rows[group] - first]
        return out


def short(exc):
    """The first line of an HDF5 error, which can run to many lines."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def describe_rows(rows):
    rows = np.asarray(rows)
    text = ", ".join(str(r) for r in rows[:5])
    return text + (f", ... ({len(rows)} rows)" if len(rows) > 5 else "")


def fingerprint(f):
    """SHA-256 identifying a data file's content: its sources' hashes and its shapes."""
    ident = {key: str(value) for key, value in f.attrs.items()}
    ident.update({name: list(f[name].shape) for name in
                  ("train/images", "train/labels", "test/images", "test/labels")})
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
