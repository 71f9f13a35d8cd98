"""Read images and labels from CSV files (plain or gzip'd).

Images: one row of 784 pixel values per image, either 0..1 floats (scaled to
0..255 and rounded) or 0..255 integers. Labels: one label per row, or a
one-hot row of 10 values. A file is read whole, up to ``MAX_CSV_BYTES``
uncompressed (MNIST's training images as CSV take 109 MB as 0..255 integers, 318 MB as
Python's shortest 0..1 floats).
"""

import numpy as np

from data_prep.idx import read_at_most, reading
from data_prep.schema import PIXELS
from distnn.errors import UserError

CLASSES = 10
MAX_CSV_BYTES = 2 ** 30  # 1 GiB uncompressed


def read_csv(path, what):
    """The bytes of the CSV file ``path`` (``what`` names it, e.g. "--train-x"), decompressed."""
    with reading(path, what) as stream:
        return read_at_most(stream, MAX_CSV_BYTES, path)


def _rows(path, text):
    """Yield (row number from 1, list of float values) for each non-empty line of ``text``."""
    try:
        lines = text.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text CSV file") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, [float(v) for v in line.split(",")]
        except ValueError:
            raise UserError(f"{path}: row {number}: a value is not a number") from None


def read_csv_images(path, what="CSV file"):
    """Return uint8 images (N, 784) and the file's decompressed bytes."""
    text, rows = read_csv(path, what), []
    for number, values in _rows(path, text):
        if len(values) != PIXELS:
            raise UserError(f"{path}: row {number} has {len(values)} values, expected {PIXELS}")
        rows.append(values)
    if not rows:
        raise UserError(f"{path}: no rows")
    pixels = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(pixels)) or pixels.min() < 0 or pixels.max() > 255:
        row = int(np.flatnonzero(~((pixels >= 0) & (pixels <= 255))).min() // PIXELS)
        raise UserError(f"{path}: row {row + 1}: pixel values must lie in 0..1 or 0..255")
    if pixels.max() <= 1.0:
        return np.rint(pixels * 255.0).astype(np.uint8), text
    if not np.array_equal(pixels, np.rint(pixels)):
        row = int(np.flatnonzero(pixels != np.rint(pixels)).min() // PIXELS)
        raise UserError(
            f"{path}: row {row + 1}: values above 1 must be integers 0..255 "
            "(or scale all pixels to 0..1)"
        )
    return pixels.astype(np.uint8), text


def read_csv_labels(path, what="CSV file"):
    """Return uint8 labels (N,) from label rows or one-hot rows, and the file's decompressed bytes."""
    text, labels = read_csv(path, what), []
    for number, values in _rows(path, text):
        if len(values) == 1:
            value = values[0]
            if not (0 <= value <= 9 and value == int(value)):
                raise UserError(f"{path}: row {number}: label {values[0]:g} is outside 0-9")
            labels.append(int(value))
        elif len(values) == CLASSES:
            if sorted(values) != [0.0] * (CLASSES - 1) + [1.0]:
                raise UserError(f"{path}: row {number}: not a one-hot row of 10 values")
            labels.append(values.index(1.0))
        else:
            raise UserError(
                f"{path}: row {number} has {len(values)} values, expected 1 label or 10 one-hot"
            )
    if not labels:
        raise UserError(f"{path}: no rows")
    return np.asarray(labels, dtype=np.uint8), text
