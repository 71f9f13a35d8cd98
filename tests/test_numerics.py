"""The same bits on every machine: exact products in any summation order, training that
does not change with numpy's SIMD paths, BLAS threads, the numpy version or mixed ranks,
and the start-up check that refuses a rank whose arithmetic differs."""

import json
import platform
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, error_line, find_mpirun, mnist_arrays, run_env, run_result, write_data
from numerics_env import oldest_numpy_env, simd_off_env

from distnn import numerics, products
from distnn.rng import Stream

sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from train_matrix import GEMMS  # noqa: E402

SMALL = ["--layers", "784,16,10", "--train-limit", "300", "--val-size", "40", "--batch-size", "40",
         "--epochs", "2", "--lr", "0.5"]


def factors(rows, terms, cols, seed):
    """A left factor with rows of very different sizes, and a weight-like right factor."""
    s = Stream(seed)
    a = s.normal((rows, terms), 1.0) * 2.0 ** np.floor(s.uniform_range(-20, 20, (rows, 1)))
    return a, s.normal((terms, cols), 0.05)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gemm", list(GEMMS))
def test_products_do_not_depend_on_the_summation_order(gemm, dtype, monkeypatch):
    a, W = factors(13, 300, 9, seed=1)
    a, W = a.astype(dtype), W.astype(dtype)
    pixels = np.floor(Stream(2).uniform_range(0, 256, (13, 300)))
    expected = [products.product(a, W, dtype), products.product(pixels, W, dtype, 8),
                products.product(a[:, :9], W[:9].T, dtype)]
    monkeypatch.setattr(products, "GEMM", GEMMS[gemm])
    got = [products.product(a, W, dtype), products.product(pixels, W, dtype, 8),
           products.product(a[:, :9], W[:9].T, dtype)]
    for e, g in zip(expected, got):
        assert e.tobytes() == g.tobytes()
    # and numpy's own float64 product does change with that order here
    plain = (a.astype(np.float64) @ W).tobytes()
    swapped = GEMMS[gemm](a.astype(np.float64), W.astype(np.float64)).tobytes()
    if plain == swapped and gemm == "einsum" and platform.machine() in ("aarch64", "arm64"):
        pytest.skip(f"on {platform.machine()} numpy's einsum gives its float64 matmul's bits "
                    "(the same summation order): no contrast to show; distnn's bits matched")
    assert plain != swapped


def test_a_row_alone_gets_the_bits_it_gets_in_a_batch():
    a, W = factors(40, 256, 10, seed=3)
    whole = products.product(a, W, np.float32)
    for i in (0, 17, 39):
        assert products.product(a[i:i + 1], W, np.float32).tobytes() == whole[i:i + 1].tobytes()


@pytest.mark.parametrize("dtype, integer, bound", [
    (np.float32, False, 2.0 ** -20), (np.float32, True, 2.0 ** -33),
    (np.float64, False, 2.0 ** -42), (np.float64, True, 2.0 ** -52)])
def test_products_are_accurate(dtype, integer, bound):
    """Error relative to sum |a_k| |w_k| (the scale of the terms) against a float64 (or for
    float64, a long double) reference."""
    a, W = factors(50, 784, 20, seed=4)
    if integer:
        a = np.floor(Stream(5).uniform_range(0, 256, a.shape))
    W = W.astype(dtype)
    got = products.product(a, W, dtype, 8 if integer else None)
    wide = np.longdouble if dtype == np.float64 else np.float64
    exact = a.astype(wide) @ W.astype(wide)
    scale = np.abs(a).astype(wide) @ np.abs(W).astype(wide)
    assert float(np.max(np.abs(got - exact) / scale)) <= bound


def test_the_sample_gives_the_reference_digest():
    assert numerics.sample_digest() == numerics.REFERENCE


@pytest.fixture(scope="module")
def small_h5(mnist_h5, tmp_path_factory):
    train_x, train_y, test_x, test_y = mnist_arrays(mnist_h5, 240, 60)
    return write_data(tmp_path_factory.mktemp("small") / "small.h5", train_x, train_y, test_x,
                      test_y)


def matrix(data, out, env=None, *extra):
    """train_matrix.py's JSON: every activation x loss x dtype trained in one process."""
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "train_matrix.py"),
                           str(data), str(out), *extra], env=env or run_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def reference_matrix(small_h5, tmp_path_factory):
    return matrix(small_h5, tmp_path_factory.mktemp("matrix"))


def test_matrix_covers_every_activation_loss_dtype_and_optimizer(reference_matrix):
    names = reference_matrix["results"]
    assert len(names) == 34 and len({digest for digest, _ in names.values()}) == 34
    assert reference_matrix["numerics"] == numerics.REFERENCE


@pytest.mark.parametrize("variation", ["simd-off", "2-blas-threads", "oldest-numpy", "einsum",
                                       "compiled"])
def test_training_bits_do_not_depend_on_the_machine(variation, reference_matrix, small_h5,
                                                    tmp_path):
    """params_sha256 and every epoch's metrics equal the reference run's, for every
    activation, loss, dtype and optimizer setting, with numpy's SIMD paths off, 2 BLAS threads, the oldest
    supported numpy, a GEMM that sums in another order (all on the numpy reference path),
    or on the compiled path (distnn.compiled)."""
    env, extra = run_env(), []
    if variation == "simd-off":
        env = simd_off_env(run_env())
        if env is None:
            pytest.skip("numpy dispatches to no optional CPU feature on this machine")
    elif variation == "oldest-numpy":
        env, version = oldest_numpy_env(run_env())
    elif variation == "compiled":
        env = run_env(compiled=True)
    elif variation == "2-blas-threads":
        extra = ["--blas-threads", "2"]
    else:
        extra = ["--gemm", variation]
    got = matrix(small_h5, tmp_path, env, *extra)
    if variation == "oldest-numpy":
        assert got["numpy"] == version != reference_matrix["numpy"]
    if variation == "compiled":
        if got["kernels"] != "numba":
            pytest.skip("numba is not installed: no compiled path to compare")
    else:
        assert got["kernels"] == reference_matrix["kernels"]
    assert got["numerics"] == numerics.REFERENCE
    for name, result in reference_matrix["results"].items():
        assert got["results"][name] == result, name


def train_command(ranks_envs, args):
    """An MPMD mpirun command: one rank per environment (a dict of variables to set)."""
    command = [find_mpirun()]
    for i, env in enumerate(ranks_envs):
        command += ([":"] if i else []) + ["-n", "1", "env", *[f"{k}={v}" for k, v in env.items()],
                                          sys.executable, "-m", "distnn.train", *map(str, args)]
    return command


def changed(env):
    """The variables of ``env`` that differ from this process's run_env()."""
    base = run_env()
    return {k: v for k, v in env.items() if base.get(k) != v}


@pytest.mark.parametrize("mix", ["simd-off+default", "default+simd-off+oldest-numpy",
                                 "compiled+default"])
def test_ranks_with_different_numerics_match_the_single_process(mix, mnist_h5, tmp_path):
    envs = {"default": {}, "simd-off": changed(simd_off_env(run_env()) or run_env()),
            "oldest-numpy": changed(oldest_numpy_env(run_env())[0]),
            "compiled": {"DISTNN_KERNELS": "auto"}}
    single = subprocess.run([sys.executable, "-m", "distnn.train", "--data", str(mnist_h5),
                             "--out", str(tmp_path / "one"), *SMALL], env=run_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    mixed = subprocess.run(train_command([envs[m] for m in mix.split("+")],
                                         ["--data", mnist_h5, "--out", tmp_path / "mix", *SMALL]),
                           env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == mixed.returncode == 0, mixed.stderr
    assert run_result(tmp_path / "mix") == run_result(tmp_path / "one")


FTZ_C = r"""
#include <xmmintrin.h>
/* what a library built with -ffast-math does when it is loaded: flush-to-zero and
   denormals-are-zero for the loading thread */
__attribute__((constructor)) static void flush_to_zero(void) { _mm_setcsr(_mm_getcsr() | 0x8040); }
"""


@pytest.fixture(scope="module")
def ftz_library(tmp_path_factory):
    """A shared library that switches on flush-to-zero when loaded (x86-64, needs a C compiler)."""
    import platform
    import shutil
    compiler = shutil.which("cc") or shutil.which("gcc")
    if platform.machine() not in ("x86_64", "AMD64") or compiler is None:
        pytest.skip("needs x86-64 and a C compiler to build a flush-to-zero library")
    folder = tmp_path_factory.mktemp("ftz")
    (folder / "ftz.c").write_text(FTZ_C)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(folder / "libftz.so"),
                    str(folder / "ftz.c")], check=True)
    return folder / "libftz.so"


def test_a_rank_with_flush_to_zero_is_refused(ftz_library, mnist_h5, tmp_path):
    """Rank 1 loads a library that switches on flush-to-zero: the job refuses to start with
    one line naming rank 1 and its host, exits 2 and writes nothing."""
    import socket
    ftz = {"DISTNN_TEST_PRELOAD": str(ftz_library)}
    args = ["--data", mnist_h5, "--out", tmp_path / "o", *SMALL]
    command = [find_mpirun(), "-n", "1", sys.executable, "-m", "distnn.train", *map(str, args),
               ":", "-n", "1", "env", *[f"{k}={v}" for k, v in ftz.items()], sys.executable,
               str(ROOT / "tests" / "helpers" / "preload_then_train.py"), *map(str, args)]
    result = subprocess.run(command, env=run_env(), cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert f"numerics check failed on rank 1 on {socket.gethostname()}:" in line
    assert "flush-to-zero" in line and "rank 0" not in line
    assert not (tmp_path / "o").exists()
    alone = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "preload_then_train.py"),
                            *map(str, args)], env={**run_env(), **ftz}, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2
    assert "numerics check failed on rank 0" in error_line(alone)
    assert not (tmp_path / "o").exists()
