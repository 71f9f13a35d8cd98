"""Read and validate MNIST IDX files (gzip'd or raw), and read any input within a size limit.

IDX layout: a 4-byte magic (0, 0, type 0x08 = uint8, ndim), ndim big-endian
uint32 sizes, then the uint8 payload. Images are magic 0x00000803 (N, 28, 28),
labels 0x00000801 (N,).

Inputs are read through :func:`reading`, which refuses a FIFO or a device
before opening it (it would block for ever), and never hold more than a limit
in memory: a small .gz can decompress to gigabytes (a "gzip bomb"), and an IDX
header can declare any size. The limit is far above any MNIST file.
"""

import gzip
import hashlib
import math
import os
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data_prep import schema
from distnn.errors import UserError
from distnn.files import reason, regular_file

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
IMAGE_SHAPE = (28, 28)
GZIP_MAGIC = b"\x1f\x8b"
MAX_IDX_BYTES = 2 ** 28  # 256 MiB uncompressed: over 340,000 images (MNIST's largest file is 47 MB)


def binary_size(count):
    """256 MiB, 1 GiB: a limit, as the messages give it."""
    return f"{count / 2 ** 30:g} GiB" if count >= 2 ** 30 else f"{count / 2 ** 20:g} MiB"


@contextmanager
def reading(path, what):
    """A binary stream of the input ``path``'s bytes, decompressed if it is gzip'd (by
    its magic). ``what`` names the input in the refusal of a FIFO, a folder or a device;
    a read error or corrupt gzip data inside becomes one UserError naming the file."""
    regular_file(path, what)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw) if compressed else raw as stream:
                yield stream
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    except MemoryError:
        raise UserError(f"{path}: too large to read into memory") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {reason(exc)}") from None


def read_at_most(stream, limit, path):
    """All of ``stream``'s bytes; UserError without reading further once there are more
    than ``limit``."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{path}: holds more than {binary_size(limit)} uncompressed, far more than "
                        "any MNIST file; data_prep reads no more")
    return data


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def read_idx(path, what, magic, item_shape):
    """Parse the IDX file ``path`` with the expected ``magic`` and item shape (the sizes
    after the count); return (uint8 array (N, *item_shape), the decompressed bytes).
    The header is checked before the payload is read: a header that declares more
    than ``MAX_IDX_BYTES`` is refused without reading it."""
    ndim = magic & 0xFF
    with reading(path, what) as stream:
        header = stream.read(4 + 4 * ndim)
        if len(header) < 4:
            raise UserError(f"{path}: too short for an IDX header ({len(header)} bytes)")
        found = int.from_bytes(header[:4], "big")
        if found != magic:
            raise UserError(f"{path}: wrong IDX magic number 0x{found:08x} (expected 0x{magic:08x})")
        if len(header) < 4 + 4 * ndim:
            raise UserError(f"{path}: truncated IDX header")
        shape = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        if shape[1:] != item_shape:
            raise UserError(f"{path}: its header declares items of shape {shape[1:]}, "
                            f"expected {item_shape}")
        if shape[0] == 0:
            raise UserError(f"{path}: holds no items (its header declares shape {shape})")
        size = math.prod(shape)  # exact: a Python int does not overflow
        if size > MAX_IDX_BYTES:
            raise UserError(f"{path}: its header declares shape {shape} ({size} bytes), more "
                            f"than the {binary_size(MAX_IDX_BYTES)} data_prep reads")
        payload = stream.read(size + 1)
    if len(payload) > size:
        raise UserError(f"{path}: holds more than the {size} bytes its header declares "
                        f"(shape {shape})")
    if len(payload) < size:
        raise UserError(f"{path}: payload is {len(payload)} bytes but the header "
                        f"declares shape {shape} ({size} bytes)")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape), header + payload


def read_images(path, what="--source file"):
    """Read an IDX image file; return (uint8 array (N, 784), decompressed bytes)."""
    images, data = read_idx(path, what, IMAGES_MAGIC, IMAGE_SHAPE)
    return images.reshape(len(images), -1), data


def read_labels(path, what="--source file"):
    """Read an IDX label file; return (uint8 array (N,), decompressed bytes)."""
    labels, data = read_idx(path, what, LABELS_MAGIC, ())
    schema.check_labels(labels, path)
    return labels, data


def find_idx(source_dir, name):
    """Locate ``name`` or ``name.gz`` in ``source_dir`` (a FIFO or a folder of that
    name is refused, not skipped)."""
    for candidate in (Path(source_dir) / (name + ".gz"), Path(source_dir) / name):
        if os.path.exists(candidate):  # False, not an error, for a name too long
            return candidate
    raise UserError(f"{source_dir}: no {name}.gz or {name} found")
