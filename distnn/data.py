"""The prepared MNIST file as seen by one rank: splits, epoch order, row reads.

Every rank opens the HDF5 file read-only itself. By default a rank holds the
images it may need in memory as uint8 (the full set: 60,000 x 784 B = 47 MB for
training plus 7.8 MB for test, about 55 MB per rank); with ``stream=True`` it
reads only the rows it is given, step by step. Labels (1 byte a row) and the
rows' SHA-256 hashes (32 bytes a row) are always held. Rows are handed out as
uint8 pixels; the trainer scales them.

Every image row read, at load or step by step, is compared with the SHA-256
that data_prep recorded for it, and the labels with theirs: a damaged block
(even one zeroed together with its Fletcher-32 checksum) or a file changed
while the run reads it raises a UserError naming the file and the rows, as
does a chunk whose checksum fails.
"""

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from data_prep import schema
from distnn.errors import UserError
from distnn.files import opening, reason
from distnn.rng import Stream

READ_ROWS = 4096  # rows per read when loading into memory


class Dataset:
    """Training, validation and test rows of one prepared file."""

    def __init__(self, path, train_limit=0, val_size=0, seed=0, stream=False):
        self.path = Path(path)
        self.file_sizes = schema.check(self.path)
        available = self.file_sizes["train"]
        if available == 0:
            raise UserError(f"{self.path}: holds no training images")
        n = available if not train_limit else min(train_limit, available)
        if val_size >= n:
            raise UserError(f"--val-size {val_size} leaves no training images out of {n}")
        order = Stream((seed, 0)).permutation(n)  # epochs count from 1
        self.rows = {"train": np.sort(order[val_size:]), "val": np.sort(order[:val_size]),
                     "test": np.arange(self.file_sizes["test"])}
        self.stream = stream
        with opening(self.path, "--data"):  # a FIFO put there since the check: a stop ends the wait
            self.file = h5py.File(self.path, "r")
        counts = {"train": n, "test": self.file_sizes["test"]}
        self.labels = {split: self._load_labels(split)[:count] for split, count in counts.items()}
        every_row_sha256 = {split: self._load(split, "image_sha256", self.file_sizes[split])
                            for split in counts}
        self.row_sha256 = {split: every_row_sha256[split][:count] for split, count in counts.items()}
        self.fingerprint = fingerprint(self.file, every_row_sha256)
        self.images = {}
        if not stream:
            for split, count in counts.items():
                self.images[split] = self._load(split, "images", count)
                self._check_rows(split, self.images[split], np.arange(count))
            # which pixels are non-zero in each training row, 98 bytes a row
            self.nonzero_bits = np.packbits(self.images["train"] != 0, axis=1)

    def close(self):
        self.file.close()

    def size(self, split):
        return len(self.rows[split])

    def epoch_order(self, epoch, seed, shuffle):
        """Positions into the training rows for one epoch: the same on every rank."""
        n = self.size("train")
        if not shuffle:
            return np.arange(n)
        return Stream((seed, epoch)).permutation(n)

    def nonzero_columns(self, positions):
        """Pixel columns non-zero in any of these training rows, without reading them
        again (None when streaming: the rows are not all on this rank)."""
        if self.stream:
            return None
        union = np.bitwise_or.reduce(self.nonzero_bits[self.rows["train"][positions]], axis=0)
        return np.flatnonzero(np.unpackbits(union)[:schema.PIXELS])

    def get(self, split, positions):
        """uint8 images (n, 784) and int64 labels for positions in a split."""
        file_rows = self.rows[split][positions]
        source = "test" if split == "test" else "train"
        labels = self.labels[source][file_rows].astype(np.int64)
        if not self.stream:
            return self.images[source][file_rows], labels
        order = np.argsort(file_rows, kind="stable")
        ascending = file_rows[order]
        images = np.empty((len(file_rows), schema.PIXELS), np.uint8)
        if len(file_rows):
            images[order] = self._read_rows(source, ascending)
        return images, labels

    def _load_labels(self, split):
        """All of a split's labels, checked for range and against their SHA-256."""
        dataset = self.file[f"{split}/labels"]
        labels = self._load(split, "labels", len(dataset))
        schema.check_labels(labels, f"{self.path}: /{split}/labels")
        if schema.labels_sha256(labels) != dataset.attrs["sha256"]:
            raise UserError(f"{self.path}: /{split}/labels do not match the SHA-256 data_prep "
                            "recorded for them: the file is damaged")
        return labels

    def _check_rows(self, split, images, rows):
        """UserError naming the ``rows`` (ascending) whose ``images`` differ from their SHA-256."""
        bad = np.flatnonzero((schema.row_sha256(images) != self.row_sha256[split][rows]).any(axis=1))
        if bad.size:
            raise UserError(f"{self.path}: /{split}/images {describe_rows(rows[bad])} "
                            f"{'does' if bad.size == 1 else 'do'} not match the SHA-256 data_prep "
                            "recorded: the file is damaged or was changed while the run read it")

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
                                f"{start}-{stop - 1}: {reason(exc)}") from None
        raise UserError(f"{self.path}: cannot read {dataset.name} rows {lo}-{hi - 1}")

    def _read_rows(self, split, rows):
        """Given image rows (ascending), read chunk by chunk: one contiguous slice per chunk
        holding any of them (far faster than HDF5's selection of scattered rows), and
        check them against their SHA-256. On failure, name the file and the rows."""
        dataset = self.file[f"{split}/images"]
        height = dataset.chunks[0] if dataset.chunks else len(rows) or 1
        out = np.empty((len(rows), *dataset.shape[1:]), dataset.dtype)
        chunk_of = rows // height
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        for group in np.split(np.arange(len(rows)), bounds):
            first = int(chunk_of[group[0]]) * height
            try:
                block = dataset[first:first + height]
            except (OSError, ValueError) as exc:
                raise UserError(f"{self.path}: cannot read {dataset.name} "
                                f"{describe_rows(rows[group])}: {reason(exc)}") from None
            out[group] = block[rows[group] - first]
        self._check_rows(split, out, rows)
        return out


def describe_rows(rows):
    """'row 7', 'rows 7, 9', or 'rows 1, 2, 3, 4, 5, ... (16 rows)'."""
    rows = np.asarray(rows)
    if len(rows) == 1:
        return f"row {int(rows[0])}"
    text = ", ".join(str(r) for r in rows[:5])
    return "rows " + text + (f", ... ({len(rows)} rows)" if len(rows) > 5 else "")


def fingerprint(f, row_sha256):
    """SHA-256 identifying a data file's content: its attributes, shapes and content hashes
    (the labels' SHA-256 and a SHA-256 over the image rows' SHA-256s, ``row_sha256``)."""
    ident = {key: str(value) for key, value in f.attrs.items()}
    for split in schema.SPLITS:
        ident.update({f"{split}/{kind}": list(f[f"{split}/{kind}"].shape)
                      for kind in ("images", "labels")})
        ident[f"{split}/labels sha256"] = str(f[f"{split}/labels"].attrs["sha256"])
        ident[f"{split}/image_sha256"] = hashlib.sha256(row_sha256[split]).hexdigest()
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
