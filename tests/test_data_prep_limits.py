"""python -m data_prep within limits: headers that lie, gzip bombs, mirrors that never stop,
inputs and outputs that are not regular files or have impossible names. Each is one line,
exit 2, no traceback, no hang and no output file."""

import gzip
import http.server
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, run_env
from test_data_prep import bundled_payload, expect_error, serve, write_idx_dir

from data_prep import IDX_NAMES, download

MEMORY_LIMIT = 3 * 2 ** 30  # address space for a data_prep child: far more than it needs
LONG_NAME = "x" * 300  # longer than any file name (255 bytes)


@pytest.fixture(scope="module")
def small_mnist():
    """The first 60 training and 20 test images and labels of the real MNIST."""
    out = {}
    for split, kind in IDX_NAMES:
        payload = np.frombuffer(bundled_payload(split, kind), np.uint8)[:(60 if split == "train" else 20)
                                                                         * (784 if kind == "images" else 1)]
        out[(split, kind)] = payload.reshape(-1, 784) if kind == "images" else payload
    return out


def header(magic, shape):
    return magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)


def zeros_gz(count):
    """A gzip stream of ``count`` GiB of zero bytes in about a thousandth of that: 16 MiB
    members, each compressed once and repeated."""
    return gzip.compress(b"\0" * 2 ** 24, compresslevel=9) * (count * 64)


def prep_limited(*args, setup=""):
    """``python -m data_prep args`` in a child whose address space is MEMORY_LIMIT, after
    the Python statements ``setup``: a bomb that is read whole ends in a MemoryError
    there, not in a machine out of memory."""
    code = f"import sys; {setup}\nfrom data_prep.__main__ import main; sys.exit(main(sys.argv[1:]))"
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=limit, check=False)


def one_line(result):
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("data_prep: error: ") and result.stderr.count("\n") == 1, \
        result.stderr
    return result.stderr


@pytest.mark.parametrize("shape, message", [
    ((2 ** 31, 2 ** 31, 4), "declares items of shape (2147483648, 4), expected (28, 28)"),
    ((2 ** 32 - 1,) * 3, "declares items of shape (4294967295, 4294967295), expected (28, 28)"),
    ((2 ** 32 - 1, 28, 28), "(3367254359280 bytes), more than the 256 MiB data_prep reads"),
])
def test_an_idx_header_that_lies_is_refused_before_its_payload(shape, message, tmp_path,
                                                               capsys, small_mnist):
    source = write_idx_dir(tmp_path / "src", small_mnist, gz=False)
    (source / "train-images-idx3-ubyte").write_bytes(header(0x803, shape))
    out = tmp_path / "mnist.h5"
    expect_error(capsys, ["--source", source, "--out", out], "train-images-idx3-ubyte", message,
                 out=out)


@pytest.mark.parametrize("case", ["idx after a true header", "idx after a huge header", "csv"])
def test_a_gzip_bomb_is_not_decompressed_whole(case, tmp_path, small_mnist):
    """A 6 MB .gz of 6 GiB: data_prep stops reading at what the header declares, or at
    its limit (made small here for a CSV, to be quick), well inside MEMORY_LIMIT."""
    source = write_idx_dir(tmp_path / "src", small_mnist)
    out, bomb = tmp_path / "mnist.h5", tmp_path / "bomb.gz"
    declared = (60, 28, 28) if case == "idx after a true header" else (2 ** 31, 28, 28)
    bomb.write_bytes((gzip.compress(header(0x803, declared)) if case != "csv" else b"")
                     + zeros_gz(6))
    if case == "csv":
        csv = {flag: bomb for flag in ("--train-x", "--train-y", "--test-x", "--test-y")}
        result = prep_limited(*[a for pair in csv.items() for a in pair], "--out", out,
                              setup="import data_prep.csv_source as c; c.MAX_CSV_BYTES = 2 ** 24")
        expected = "holds more than 16 MiB uncompressed, far more than any MNIST file"
    else:
        os.replace(bomb, source / "train-images-idx3-ubyte.gz")
        result = prep_limited("--source", source, "--out", out)
        expected = ("holds more than the 47040 bytes its header declares" if "true" in case
                    else "declares shape (2147483648, 28, 28) (1683627180032 bytes), more than")
    assert expected in one_line(result)
    assert not out.exists()


def run_guarded(fifo, *args):
    """data_prep ``args`` in a child; should it block on ``fifo`` (the old code opens it),
    let it go on (a writer opens and closes the FIFO), end it and fail."""
    child = subprocess.Popen([sys.executable, "-m", "data_prep", *map(str, args)], cwd=ROOT,
                             env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        child.kill()
        child.communicate()
        pytest.fail(f"data_prep blocked on {fifo}")
    return subprocess.CompletedProcess(child.args, child.returncode, "", err)


@pytest.mark.parametrize("role", ["--source file", "--train-x", "--out", "--out with --force"])
def test_a_fifo_is_refused_before_it_is_opened(role, tmp_path, small_mnist):
    source = write_idx_dir(tmp_path / "src", small_mnist)
    fifo, out = tmp_path / "fifo", tmp_path / "mnist.h5"
    if role == "--source file":
        fifo = source / "t10k-labels-idx1-ubyte.gz"
        fifo.unlink()
        args = ["--source", source, "--out", out]
    elif role == "--train-x":
        for flag in ("--train-y", "--test-x", "--test-y"):
            (tmp_path / flag).write_text("1\n")
        args = ["--train-x", fifo, *[a for flag in ("--train-y", "--test-x", "--test-y")
                                     for a in (flag, tmp_path / flag)], "--out", out]
    else:
        out = fifo
        args = ["--source", source, "--out", out, *["--force"] * ("force" in role)]
    os.mkfifo(fifo)
    result = run_guarded(fifo, *args)
    assert f"{role.split()[0]}{' file' * ('file' in role)} {fifo}: is a FIFO, not a regular file" \
        in one_line(result)
    assert os.path.exists(fifo) and not os.path.isfile(fifo)


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("target", ["a prepared file", "a missing file"])
def test_an_out_that_is_a_symlink_is_refused(target, force, tmp_path, capsys, small_mnist):
    """data_prep neither writes through a symlink nor replaces one with a file: the user
    names the file itself."""
    source = write_idx_dir(tmp_path / "src", small_mnist)
    real, link = tmp_path / "real.h5", tmp_path / "link.h5"
    if target == "a prepared file":
        subprocess.run([sys.executable, "-m", "data_prep", "--source", str(source), "--out", str(real)],
                       cwd=ROOT, env=run_env(), capture_output=True, check=True)
    before = real.read_bytes() if real.exists() else None
    link.symlink_to(real)
    expect_error(capsys, ["--source", source, "--out", link, *["--force"] * force],
                 f"--out {link}: is a symbolic link, not a regular file")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real.read_bytes() if real.exists() else None) == before


@pytest.mark.parametrize("flag", ["--out", "--source"])
def test_a_name_longer_than_the_system_allows_is_one_line(flag, tmp_path, capsys, small_mnist):
    source = write_idx_dir(tmp_path / "src", small_mnist)
    args = {"--out": ["--source", source, "--out", tmp_path / LONG_NAME],
            "--source": ["--source", tmp_path / LONG_NAME, "--out", tmp_path / "mnist.h5"]}[flag]
    expect_error(capsys, args, f"{flag} {tmp_path / LONG_NAME}: File name too long")


# ---- mirrors that never stop ----------------------------------------------------------


class Endless(http.server.BaseHTTPRequestHandler):
    """Sends zeros, without a Content-Length, until the client hangs up, ``stop`` is set
    or ``CAP_BYTES`` went out (then closes: the old code, which reads on, ends too);
    ``pause`` seconds between writes of ``piece`` bytes; ``announce`` a Content-Length."""
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes
    stop, piece, pause, announce, CAP_BYTES = threading.Event(), 2 ** 16, 0.0, None, 2 ** 27

    def do_GET(self):
        self.send_response(200)
        if self.announce:
            self.send_header("Content-Length", str(self.announce))
        self.end_headers()
        sent = 0
        try:
            while sent < self.CAP_BYTES and not self.stop.wait(self.pause):
                self.wfile.write(b"\0" * self.piece)
                self.wfile.flush()
                sent += self.piece
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mirror, limit, message", [
    ("streams for ever", {"MAX_BYTES": 2 ** 20}, "sent more than 1 MiB, more than any MNIST file"),
    ("announces too much", {"MAX_BYTES": 2 ** 20}, "announces 1048577 bytes, more than the 1 MiB"),
    ("trickles", {"MAX_SECONDS": 1}, "took longer than 1 s"),
])
def test_a_mirror_cannot_keep_a_download_going(mirror, limit, message, tmp_path, capsys,
                                               monkeypatch):
    """The limits, made small here (download.MAX_BYTES, MAX_SECONDS), end the download of
    the first file on time with one line naming the mirror's URL."""
    handler = type("Mirror", (Endless,), {"stop": threading.Event()})
    if mirror == "trickles":
        handler.piece, handler.pause, handler.CAP_BYTES = 1, 0.05, 200  # ten seconds
    if mirror == "announces too much":
        handler.announce = 2 ** 20 + 1
    for name, value in limit.items():
        monkeypatch.setattr(download, name, value, raising=False)
    out = tmp_path / "dl.h5"
    with serve(handler) as base:
        start = time.monotonic()
        try:
            err = expect_error(capsys, ["--download", "--mirror", base, "--out", out],
                               f"{base}/{IDX_NAMES[('train', 'images')]}.gz: {message}", out=out)
        finally:
            handler.stop.set()
    assert time.monotonic() - start < 8, err
