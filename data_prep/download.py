"""Fetch the four MNIST IDX files from mirrors and verify their SHA-256.

A download is accepted only when the hash of its decompressed bytes matches
the bundled ``SHA256SUMS`` (re-compressed .gz files differ between mirrors,
the decompressed bytes do not).
"""

import gzip
import hashlib
import http.client
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from data_prep import BUNDLED_DIR, IDX_NAMES
from distnn.errors import UserError

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
TIMEOUT_S = 30


def known_sums(path=BUNDLED_DIR / "SHA256SUMS"):
    """Map file name -> SHA-256 hex from a ``sha256sum``-style file."""
    sums = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name.lstrip("*")] = digest
    return sums


def _fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise UserError(f"{url}: download failed: {getattr(exc, 'reason', exc)}") from None


def _verify(url, payload, name, sums):
    try:
        raw = gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload
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
