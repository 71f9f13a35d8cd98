"""Fetch the four MNIST IDX files from mirrors and verify their SHA-256.

A download is accepted only when the hash of its decompressed bytes matches
the bundled ``SHA256SUMS`` (re-compressed .gz files differ between mirrors,
the decompressed bytes do not).

A mirror cannot keep data_prep for ever: a file is refused once it sends more
than ``MAX_BYTES`` (announced or received, with or without a Content-Length)
or takes longer than ``MAX_SECONDS`` in all, besides ``TIMEOUT_S`` for any
single wait; its decompressed bytes are limited like any input's
(:data:`data_prep.idx.MAX_IDX_BYTES`). Then the next mirror is tried.
"""

import gzip
import hashlib
import http.client
import io
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from data_prep import BUNDLED_DIR, IDX_NAMES
from data_prep.idx import GZIP_MAGIC, MAX_IDX_BYTES, binary_size, read_at_most
from distnn.errors import UserError

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
TIMEOUT_S = 30  # the longest wait for a connection or for the next bytes
MAX_SECONDS = 300  # the longest a file may take in all (10 MB at 33 kB/s)
MAX_BYTES = 2 ** 26  # 64 MiB: MNIST's largest file is 9.9 MB as .gz, 47 MB uncompressed
READ_BYTES = 2 ** 16


def known_sums(path=BUNDLED_DIR / "SHA256SUMS"):
    """Map file name -> SHA-256 hex from a ``sha256sum``-style file."""
    sums = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name.lstrip("*")] = digest
    return sums


def _fetch(url):
    """The body at ``url``, within ``MAX_BYTES`` and ``MAX_SECONDS``."""
    deadline = time.monotonic() + MAX_SECONDS
    try:
        with urllib.request.urlopen(url, timeout=min(TIMEOUT_S, MAX_SECONDS)) as response:
            announced = response.headers.get("Content-Length", "")
            if announced.isdigit() and int(announced) > MAX_BYTES:
                raise UserError(f"{url}: announces {announced} bytes, more than the "
                                f"{binary_size(MAX_BYTES)} any MNIST file takes")
            body = bytearray()
            while chunk := response.read1(READ_BYTES):  # returns what one read brings
                body += chunk
                if len(body) > MAX_BYTES:
                    raise UserError(f"{url}: sent more than {binary_size(MAX_BYTES)}, more than any "
                                    "MNIST file takes; stopped")
                if time.monotonic() > deadline:
                    raise UserError(f"{url}: took longer than {MAX_SECONDS:g} s "
                                    f"({len(body)} bytes received); stopped")
            if announced.isdigit() and len(body) < int(announced):
                raise UserError(f"{url}: download failed: the connection closed after "
                                f"{len(body)} of the {announced} bytes announced")
            return bytes(body)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise UserError(f"{url}: download failed: {getattr(exc, 'reason', exc)}") from None


def _verify(url, payload, name, sums):
    try:
        raw = (read_at_most(gzip.GzipFile(fileobj=io.BytesIO(payload)), MAX_IDX_BYTES, url)
               if payload[:2] == GZIP_MAGIC else payload)
    except (EOFError, OSError, zlib.error):
        raise UserError(f"{url}: corrupt or truncated gzip data") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sums[name]:
        raise UserError(f"{url}: checksum mismatch (sha256 {digest}, expected {sums[name]})")


def download(dest_dir, mirrors=MIRRORS):
    """Download the four files into ``dest_dir``, trying each mirror in turn.

    Every file is verified before it is written. Raises UserError naming the
    last failure if no mirror gives a verified copy of a file.
    """
    sums = known_sums()
    for name in IDX_NAMES.values():
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name + ".gz"
            try:
                payload = _fetch(url)
                _verify(url, payload, name, sums)
            except UserError as exc:
                errors.append(str(exc))
                continue
            (Path(dest_dir) / (name + ".gz")).write_bytes(payload)
            break
        else:
            raise UserError(errors[-1] if errors else "no mirror given")
