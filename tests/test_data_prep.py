"""python -m data_prep: the real MNIST into schema-2 HDF5, and every bad input refused cleanly."""

import gzip
import hashlib
import http.server
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, run_env
from data_prep import BUNDLED_DIR, IDX_NAMES
from data_prep.__main__ import main as prep_main
from data_prep.download import known_sums

HEADERS = {"images": 16, "labels": 8}


def run_prep(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, args)],
                          cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=120)


def bundled_payload(split, kind):
    """The decompressed payload (after the IDX header) of a bundled file, read independently."""
    raw = gzip.decompress((BUNDLED_DIR / (IDX_NAMES[(split, kind)] + ".gz")).read_bytes())
    return raw[HEADERS[kind]:]


def write_idx(path, array, magic, gz=True):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    Path(path).write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture(scope="module")
def small_mnist():
    """First 120 training and 40 test images/labels of the real MNIST."""
    out = {}
    for (split, kind) in IDX_NAMES:
        n = 120 if split == "train" else 40
        payload = np.frombuffer(bundled_payload(split, kind), np.uint8)
        out[(split, kind)] = payload.reshape(-1, 784)[:n] if kind == "images" else payload[:n]
    return out


def write_idx_dir(folder, arrays, gz=True):
    folder.mkdir(exist_ok=True)
    for (split, kind), array in arrays.items():
        name = IDX_NAMES[(split, kind)] + (".gz" if gz else "")
        shape_array = array.reshape(-1, 28, 28) if kind == "images" else array
        write_idx(folder / name, shape_array, 0x803 if kind == "images" else 0x801, gz)
    return folder


def expect_error(capsys, argv, *fragments, out=None):
    """Run main(argv); assert exit 1, a one-line message with all fragments, no output left."""
    assert prep_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("data_prep: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    if out is not None:
        assert not out.exists() or out.is_dir()
        leftovers = [p.name for p in out.parent.glob(f".{out.name}*")] if out.parent.exists() else []
        assert leftovers == []
    return err


def test_bundled_mnist_matches_idx_payloads(mnist_h5):
    sums = known_sums()
    with h5py.File(mnist_h5, "r") as f:
        assert f.attrs["schema_version"] == 2
        assert tuple(f.attrs["image_shape"]) == (28, 28)
        for (split, kind), name in IDX_NAMES.items():
            ds = f[f"{split}/{kind}"]
            assert ds.dtype == np.uint8
            expected = hashlib.sha256(bundled_payload(split, kind)).hexdigest()
            assert hashlib.sha256(ds[...].tobytes()).hexdigest() == expected
            assert f.attrs[f"sha256_{split}_{kind}"] == sums[name]
            if kind == "labels":
                assert ds.attrs["sha256"] == hashlib.sha256(bundled_payload(split, kind)).hexdigest()
            else:  # the SHA-256 of each row, computed independently here
                rows = bundled_payload(split, kind)
                hashes = f[f"{split}/image_sha256"]
                for i in (0, 1, 12345 % len(ds), len(ds) - 1):
                    assert hashes[i].tobytes() == hashlib.sha256(rows[784 * i:784 * (i + 1)]).digest()
        assert f["train/images"].shape == (60000, 784)
        assert f["test/images"].shape == (10000, 784)
        assert f["train/images"].chunks == (16, 784) and f["train/images"].fletcher32


def test_cli_keeps_good_output_and_force_rebuilds(tmp_path, mnist_h5):
    out = tmp_path / "mnist.h5"
    shutil.copy(mnist_h5, out)
    before = out.stat().st_mtime_ns
    result = run_prep("--out", out)
    assert result.returncode == 0 and "kept" in result.stdout
    assert out.stat().st_mtime_ns == before
    result = run_prep("--out", out, "--force")
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mtime_ns != before


def test_default_output_is_relative_to_working_directory(tmp_path, small_mnist):
    source = write_idx_dir(tmp_path / "src", small_mnist, gz=False)
    result = run_prep("--source", source, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "data" / "mnist.h5", "r") as f:
        np.testing.assert_array_equal(f["train/images"][...], small_mnist[("train", "images")])
        np.testing.assert_array_equal(f["test/labels"][...], small_mnist[("test", "labels")])


def test_existing_invalid_output_is_refused_without_force(tmp_path, capsys, small_mnist):
    source = write_idx_dir(tmp_path / "src", small_mnist)
    out = tmp_path / "mnist.h5"
    out.write_bytes(b"not hdf5")
    assert prep_main(["--source", str(source), "--out", str(out)]) == 2
    assert "use --force" in capsys.readouterr().err
    assert out.read_bytes() == b"not hdf5"
    assert prep_main(["--source", str(source), "--out", str(out), "--force"]) == 0


def test_csv_input_floats_ints_and_one_hot(tmp_path, small_mnist):
    def write_csv(name, rows, fmt):
        with gzip.open(tmp_path / name, "wt") as f:
            for row in rows.reshape(len(rows), -1):
                f.write(",".join(fmt(v) for v in row) + "\n")
        return tmp_path / name

    train_x = write_csv("TrainDigitX.csv.gz", small_mnist[("train", "images")] / 255.0,
                        lambda v: repr(float(v)))
    train_y = write_csv("TrainDigitY.csv.gz", np.eye(10)[small_mnist[("train", "labels")]],
                        lambda v: str(int(v)))
    test_x = write_csv("TestDigitX.csv.gz", small_mnist[("test", "images")], str)
    test_y = write_csv("TestDigitY.csv.gz", small_mnist[("test", "labels")], str)
    out = tmp_path / "csv.h5"
    assert prep_main(["--train-x", str(train_x), "--train-y", str(train_y), "--test-x",
                      str(test_x), "--test-y", str(test_y), "--out", str(out)]) == 0
    with h5py.File(out, "r") as f:
        for key, array in small_mnist.items():
            np.testing.assert_array_equal(f[f"{key[0]}/{key[1]}"][...], array)
        assert f.attrs["source_train_images"] == "TrainDigitX.csv.gz"


# ---- bad inputs: message, exit code, nothing left behind -------------------------------


def test_truncated_gzip(tmp_path, capsys, small_mnist):
    source = write_idx_dir(tmp_path / "src", small_mnist)
    bad = source / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-200])
    out = tmp_path / "out" / "mnist.h5"
    expect_error(capsys, ["--source", source, "--out", out],
                 "train-images-idx3-ubyte.gz", "corrupt or truncated gzip", out=out)


def test_corrupt_gzip(tmp_path, capsys, small_mnist):
    source = write_idx_dir(tmp_path / "src", small_mnist)
    bad = source / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(bad.read_bytes())
    data[20:30] = b"\xff" * 10
    bad.write_bytes(bytes(data))
    out = tmp_path / "mnist.h5"
    expect_error(capsys, ["--source", source, "--out", out],
                 "t10k-labels-idx1-ubyte.gz", "gzip", out=out)


def test_wrong_idx_magic(tmp_path, capsys, small_mnist):
    source = write_idx_dir(tmp_path / "src", small_mnist, gz=False)
    write_idx(source / "train-labels-idx1-ubyte", small_mnist[("train", "labels")], 0x803, gz=False)
    out = tmp_path / "mnist.h5"
    expect_error(capsys, ["--source", source, "--out", out],
                 "train-labels-idx1-ubyte", "wrong IDX magic number 0x00000803", out=out)


def test_truncated_idx_payload(tmp_path, capsys, small_mnist):
    source = write_idx_dir(tmp_path / "src", small_mnist, gz=False)
    bad = source / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-784])
    out = tmp_path / "mnist.h5"
    expect_error(capsys, ["--source", source, "--out", out],
                 "t10k-images-idx3-ubyte", "header declares shape (40, 28, 28)", out=out)


def test_image_and_label_counts_differ(tmp_path, capsys, small_mnist):
    arrays = dict(small_mnist)
    arrays[("train", "labels")] = arrays[("train", "labels")][:-1]
    source = write_idx_dir(tmp_path / "src", arrays)
    out = tmp_path / "mnist.h5"
    expect_error(capsys, ["--source", source, "--out", out],
                 "120 images", "119 labels", out=out)


def test_labels_outside_range(tmp_path, capsys, small_mnist):
    arrays = dict(small_mnist)
    labels = arrays[("test", "labels")].copy()
    labels[7] = 11
    arrays[("test", "labels")] = labels
    source = write_idx_dir(tmp_path / "src", arrays)
    out = tmp_path / "mnist.h5"
    expect_error(capsys, ["--source", source, "--out", out],
                 "t10k-labels-idx1-ubyte.gz", "label 11 at index 7 is outside 0-9", out=out)


@pytest.fixture
def csv_files(tmp_path, small_mnist):
    paths = {}
    for (split, kind), array in small_mnist.items():
        path = tmp_path / f"{split}_{kind}.csv"
        rows = array if array.ndim == 2 else array[:, None]
        path.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
        paths[f"--{split}-{'x' if kind == 'images' else 'y'}"] = path
    return paths


def csv_argv(paths, out):
    return [a for flag, path in paths.items() for a in (flag, path)] + ["--out", out]


def test_idx_file_without_items(tmp_path, capsys, small_mnist):
    arrays = dict(small_mnist)
    arrays[("test", "images")] = arrays[("test", "images")][:0]
    arrays[("test", "labels")] = arrays[("test", "labels")][:0]
    source = write_idx_dir(tmp_path / "src", arrays)
    out = tmp_path / "mnist.h5"
    expect_error(capsys, ["--source", source, "--out", out],
                 "t10k-images-idx3-ubyte.gz", "holds no items", out=out)


@pytest.mark.parametrize("label", ["nan", "inf", "3.5"])
def test_csv_label_not_a_digit(tmp_path, capsys, csv_files, label):
    path = csv_files["--test-y"]
    lines = path.read_text().splitlines()
    lines[0] = label
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "mnist.h5"
    expect_error(capsys, csv_argv(csv_files, out), "test_labels.csv", "row 1: label", "outside 0-9",
                 out=out)


def test_csv_row_of_wrong_length(tmp_path, capsys, csv_files):
    path = csv_files["--train-x"]
    lines = path.read_text().splitlines()
    lines[4] = ",".join(lines[4].split(",")[:-1])
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "mnist.h5"
    expect_error(capsys, csv_argv(csv_files, out),
                 "train_images.csv", "row 5 has 783 values, expected 784", out=out)


def test_csv_value_out_of_range(tmp_path, capsys, csv_files):
    path = csv_files["--test-x"]
    lines = path.read_text().splitlines()
    lines[2] = "300," + lines[2].split(",", 1)[1]
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "mnist.h5"
    expect_error(capsys, csv_argv(csv_files, out),
                 "test_images.csv", "row 3", "0..255", out=out)


def test_csv_label_out_of_range(tmp_path, capsys, csv_files):
    path = csv_files["--train-y"]
    lines = path.read_text().splitlines()
    lines[9] = "12"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "mnist.h5"
    expect_error(capsys, csv_argv(csv_files, out),
                 "train_labels.csv", "row 10: label 12 is outside 0-9", out=out)


def test_output_path_is_a_directory(tmp_path, capsys, small_mnist):
    source = write_idx_dir(tmp_path / "src", small_mnist)
    out = tmp_path / "outdir"
    out.mkdir()
    expect_error(capsys, ["--source", source, "--out", out], "outdir", "is a folder, not a regular file")
    assert list(out.iterdir()) == []


def test_output_path_unwritable(tmp_path, capsys, small_mnist):
    source = write_idx_dir(tmp_path / "src", small_mnist)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    out = blocker / "mnist.h5"
    expect_error(capsys, ["--source", source, "--out", out], f"--out {out}: Not a directory")
    assert blocker.read_text() == "a file, not a folder"


# ---- --download against a loopback server ------------------------------------------------


@contextmanager
def serve(handler):
    """An http server on 127.0.0.1 answering with ``handler``; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_dir(tmp_path):
    """Serve a folder over http on 127.0.0.1; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args):
            pass

    with serve(Quiet) as base:
        yield root, base


def test_download_verifies_and_falls_back_between_mirrors(tmp_path, http_dir, mnist_h5):
    root, base = http_dir
    (root / "good").mkdir()
    for path in BUNDLED_DIR.glob("*.gz"):
        shutil.copy(path, root / "good" / path.name)
    out = tmp_path / "dl.h5"
    result = run_prep("--download", "--mirror", f"{base}/missing/", "--mirror",
                      f"{base}/good/", "--out", out)
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as f, h5py.File(mnist_h5, "r") as ref:
        for split, kind in IDX_NAMES:
            key = f"{split}/{kind}"
            assert np.array_equal(f[key][...], ref[key][...])


def test_download_cut_short_tries_the_next_mirror(tmp_path, capsys):
    """A server that closes before sending all it announced: a clean error, no traceback."""
    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + b"\0" * 50)

        def log_message(self, *args):
            pass

    with serve(Short) as base:
        out = tmp_path / "dl.h5"
        err = expect_error(capsys, ["--download", "--mirror", base, "--out", out],
                           "train-images-idx3-ubyte.gz", "download failed", out=out)
        assert "Traceback" not in err


def test_download_checksum_mismatch(tmp_path, http_dir, capsys):
    root, base = http_dir
    for path in BUNDLED_DIR.glob("*.gz"):
        shutil.copy(path, root / path.name)
    tampered = root / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(tampered.read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    tampered.write_bytes(gzip.compress(bytes(raw)))
    out = tmp_path / "dl.h5"
    expect_error(capsys, ["--download", "--mirror", base, "--out", out],
                 "train-labels-idx1-ubyte.gz", "checksum mismatch", out=out)
