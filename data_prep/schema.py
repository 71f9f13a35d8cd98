"""distnn's MNIST HDF5 file, schema version 2: writing it atomically, checking it.

Layout:
  /train/images  uint8 (N, 784)    /train/labels  uint8 (N,)
  /test/images   uint8 (M, 784)    /test/labels   uint8 (M,)
  /train/image_sha256  uint8 (N, 32)   the SHA-256 of each image row's 784 bytes
  /test/image_sha256   uint8 (M, 32)
  /<split>/labels attribute sha256: the SHA-256 of all the split's label bytes
  root attributes: schema_version = 2, image_shape = (28, 28),
  source_<split>_<kind> = source file name, sha256_<split>_<kind> = its SHA-256.

Image datasets are chunked by 16 rows (16 x 784 B = 12.25 KiB, uncompressed).
Trainers read rows two ways: contiguous runs (loading the set into memory, an
evaluation slice), which read whole chunks back to back at any chunk size, and,
with ``--stream``, a step's rows scattered over the whole set, where every row
costs a read of its whole chunk: small chunks keep that to 12 KiB a row (a
256-row chunk would cost 196 KiB). No compression, so no decompression sits on
the read path.

Two checks guard the content. Every chunk carries a Fletcher-32 checksum, so
HDF5 refuses to read a chunk whose bytes changed. That misses a block zeroed
together with its checksum (the checksum of zeros is zero), a common storage
failure, and a file replaced while it is open; so every image row also has its
SHA-256, and the labels one for the split, which readers compare with what they
read (the 2 MB of row hashes cost 4 % of the file; hashing a row takes about a
microsecond).
"""

import hashlib
import os
import re
from pathlib import Path

import h5py
import numpy as np

from distnn.errors import UserError
from distnn.files import atomic_write, opening, reason, regular_file

SCHEMA_VERSION = 2
IMAGE_SHAPE = (28, 28)
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]  # 784: the input width of every network
CHUNK_ROWS = 16
SPLITS = ("train", "test")
DIGEST = 32  # bytes of a SHA-256


def check_labels(labels, where):
    """UserError naming ``where`` and the first bad row unless every uint8 label is a digit."""
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise UserError(f"{where}: label {int(labels[bad[0]])} at index {int(bad[0])} is "
                        f"outside 0-9 ({bad.size} bad labels)")


def row_sha256(images):
    """The SHA-256 of each row of ``images`` (n, 784) uint8, as uint8 (n, 32)."""
    digests = b"".join(hashlib.sha256(row).digest() for row in np.ascontiguousarray(images))
    return np.frombuffer(digests, np.uint8).reshape(len(images), DIGEST)


def labels_sha256(labels):
    return hashlib.sha256(np.ascontiguousarray(labels, np.uint8).tobytes()).hexdigest()


def write(out, arrays, sources):
    """Write ``arrays[(split, kind)]`` to ``out`` atomically.

    ``sources[(split, kind)]`` is (file name, sha256 hex). The file is written
    under a temporary name in the same folder, fsync'd, then renamed, so a
    crash or error never leaves a partial file at ``out``.
    """
    out = Path(out)
    for split in SPLITS:
        images, labels = arrays[(split, "images")], arrays[(split, "labels")]
        if len(images) != len(labels):
            raise UserError(
                f"{sources[(split, 'images')][0]}: {len(images)} images but "
                f"{sources[(split, 'labels')][0]} has {len(labels)} labels"
            )
    out.parent.mkdir(parents=True, exist_ok=True)

    def write_file(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["image_shape"] = np.asarray(IMAGE_SHAPE, dtype=np.int64)
            for (split, kind), data in arrays.items():
                data = np.ascontiguousarray(data, np.uint8)
                chunks = ((min(CHUNK_ROWS, len(data)), PIXELS) if kind == "images"
                          else (min(1024 * CHUNK_ROWS, len(data)),))
                dataset = f.create_dataset(f"{split}/{kind}", data=data,
                                           chunks=chunks if len(data) else None,
                                           fletcher32=bool(len(data)))
                if kind == "images":
                    f[f"{split}/image_sha256"] = row_sha256(data)
                else:
                    dataset.attrs["sha256"] = labels_sha256(data)
                name, digest = sources[(split, kind)]
                f.attrs[f"source_{split}_{kind}"] = name
                f.attrs[f"sha256_{split}_{kind}"] = digest
    atomic_write(out, write_file)


def check(path, what="--data"):
    """Raise UserError unless ``path`` is a readable schema-2 file; return its sizes.

    ``what`` names the path in the refusal of a FIFO, a folder or a device (never
    opened: it would block). Attributes must have the types data_prep writes, and every
    dataset must store the bytes its shape declares: a sparse file declaring a billion
    rows would otherwise be read into memory as zeros."""
    path = Path(path)
    regular_file(path, what)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file (prepare it with: python -m data_prep --out {path})")
    try:
        with opening(path, what):
            f = h5py.File(path, "r")
        with f:
            check_version(path, f.attrs.get("schema_version"))
            return {split: check_split(path, f, split) for split in SPLITS}
    except OSError as exc:
        raise UserError(f"{path}: not a readable HDF5 file ({reason(exc)})") from None


def held(path, f, name, holder="a data file"):
    """The object at ``name`` (None if missing), reached through hard links only and, for
    a dataset, with its values in this file: following a link or external storage to
    another file could open a FIFO, which blocks for ever (distnn writes neither).
    ``holder`` names the kind of file in the message."""
    found = f
    for part in name.split("/"):
        link = found.get(part, getlink=True) if isinstance(found, h5py.Group) else None
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            raise UserError(f"{path}: /{name} is reached through a link ({type(link).__name__}); "
                            f"{holder} holds its arrays itself")
        found = found[part]
    if isinstance(found, h5py.Dataset) and (found.external or found.is_virtual):
        raise UserError(f"{path}: /{name} keeps its values in other files; {holder} holds "
                        "its arrays itself")
    return found


def describe(value):
    """An attribute's value and type, as a message shows it: 2, '2' (a string), an array..."""
    if value is None:
        return "missing"
    if isinstance(value, np.ndarray):
        return f"an array {value.dtype}{value.shape}"
    if isinstance(value, (str, bytes)):
        return f"{value[:80]!r} (a {'string' if isinstance(value, str) else 'byte string'})"
    return f"{value} ({type(value).__name__})" if not is_integer(value) else str(value)


def is_integer(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_version(path, version):
    if not (is_integer(version) and version == SCHEMA_VERSION):
        raise UserError(f"{path}: schema_version is {describe(version)}, expected {SCHEMA_VERSION} "
                        f"(prepare it again: python -m data_prep --force --out {path})")


def check_split(path, f, split):
    """The number of rows of ``split``, once its datasets have the right types and shapes,
    store what they declare, and the labels carry their SHA-256."""
    images, labels, hashes = (held(path, f, f"{split}/{kind}")
                              for kind in ("images", "labels", "image_sha256"))
    if not all(isinstance(d, h5py.Dataset) for d in (images, labels, hashes)):
        raise UserError(f"{path}: missing /{split}/images, /{split}/labels or "
                        f"/{split}/image_sha256")
    if (images.dtype != np.uint8 or labels.dtype != np.uint8
            or images.ndim != 2 or images.shape[1] != PIXELS
            or labels.shape != (images.shape[0],)):
        raise UserError(
            f"{path}: /{split} has images {images.dtype}{images.shape} and labels "
            f"{labels.dtype}{labels.shape}, expected uint8 (N, {PIXELS}) and uint8 (N,)"
        )
    if hashes.dtype != np.uint8 or hashes.shape != (images.shape[0], DIGEST) \
            or "sha256" not in labels.attrs:
        raise UserError(f"{path}: /{split} lacks its content hashes "
                        f"(image_sha256 uint8 (N, {DIGEST}), labels attribute sha256)")
    digest = labels.attrs["sha256"]
    if not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
        raise UserError(f"{path}: /{split}/labels attribute sha256 is {describe(digest)}, "
                        "expected a SHA-256 as 64 hex digits")
    for dataset in (images, labels, hashes):
        stored = dataset.id.get_storage_size()
        if stored < dataset.nbytes:
            raise UserError(f"{path}: {dataset.name} declares shape {dataset.shape} "
                            f"({dataset.nbytes} bytes) but stores only {stored} bytes: not a "
                            "complete file written by data_prep (prepare it again)")
    return images.shape[0]
