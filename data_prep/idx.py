"""Read and validate MNIST IDX files (gzip'd or raw).

IDX layout: a 4-byte magic (0, 0, type 0x08 = uint8, ndim), ndim big-endian
uint32 sizes, then the uint8 payload. Images are magic 0x00000803 (N, 28, 28),
labels 0x00000801 (N,).
"""

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from data_prep import schema
from distnn.errors import UserError


IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
IMAGE_SHAPE = (28, 28)


def read_bytes(path):
    """Return the decompressed bytes of ``path`` (gzip detected by its magic)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise UserError(f"{path}: corrupt or truncated gzip data ({exc})") from None


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def parse_idx(data, path, magic):
    """Parse IDX bytes with the expected ``magic``; return a uint8 array."""
    if len(data) < 4:
        raise UserError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise UserError(
            f"{path}: wrong IDX magic number 0x{found:08x} (expected 0x{magic:08x})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if shape[0] == 0:
        raise UserError(f"{path}: holds no items (its header declares shape {shape})")
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise UserError(
            f"{path}: payload is {len(data) - header} bytes but the header "
            f"declares shape {shape} ({expected - header} bytes)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_images(path):
    """Read an IDX image file; return (uint8 array (N, 784), decompressed bytes)."""
    data = read_bytes(path)
    images = parse_idx(data, path, IMAGES_MAGIC)
    if images.shape[1:] != IMAGE_SHAPE:
        raise UserError(f"{path}: images are {images.shape[1:]}, expected {IMAGE_SHAPE}")
    return images.reshape(len(images), -1), data


def read_labels(path):
    """Read an IDX label file; return (uint8 array (N,), decompressed bytes)."""
    data = read_bytes(path)
    labels = parse_idx(data, path, LABELS_MAGIC)
    schema.check_labels(labels, path)
    return labels, data


def find_idx(source_dir, name):
    """Locate ``name`` or ``name.gz`` in ``source_dir``."""
    for candidate in (Path(source_dir) / (name + ".gz"), Path(source_dir) / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"{source_dir}: no {name}.gz or {name} found")
