"""distnn.fixedmath: accuracy against independent references, special values, shapes,
the same bits under every numpy CPU dispatch and numpy version, and the summation order."""

import json
import math
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from distnn import fixedmath as fm

ROOT = Path(__file__).resolve().parents[1]
NP124 = Path("/tmp/np124")  # numpy 1.24.4 installed with `pip install --target`
ELEMENTWISE = ["exp", "expm1", "log", "log1p", "tanh", "sigmoid", "softplus"]
# x87 long double (64-bit significand) makes numpy's functions a reference whose own error
# is far below a float64 ulp; elsewhere numpy's float64 functions are the reference and
# their own error (up to about 1 ulp each, a little more for the composite formulas) is added.
EXTENDED = np.finfo(np.longdouble).nmant >= 63
REF = np.longdouble if EXTENDED else np.float64
SLACK = 0.0 if EXTENDED else 2.0
# Largest float64 error seen (in ulps) over tens of millions of random arguments, rounded up.
BOUND = {"exp": 1.0, "expm1": 1.5, "log": 1.0, "log1p": 1.0,
         "tanh": 2.0, "sigmoid": 2.0, "softplus": 2.0}


def _sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1, e) / (1 + e)


def _softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


REFERENCE = {"exp": np.exp, "expm1": np.expm1, "log": np.log, "log1p": np.log1p,
             "tanh": np.tanh, "sigmoid": _sigmoid, "softplus": _softplus}


def _arguments(name, n=40_000):
    """Random float64 arguments for ``name``: its full range, near 0, near its limits."""
    rng = np.random.default_rng(sum(map(ord, name)))

    def uniform(a, b):
        return rng.uniform(a, b, n)

    def tiny(a=1e-300, b=1.0):  # log-uniform magnitudes, both signs
        return np.exp(rng.uniform(np.log(a), np.log(b), n)) * rng.choice([-1.0, 1.0], n)

    sets = {
        "exp": [uniform(-745.1, 709.78), uniform(-2, 2), tiny(), uniform(700, 709.78),
                uniform(-745.1, -708)],                        # subnormal results
        "expm1": [uniform(-60, 709.78), uniform(-2, 2), tiny(), uniform(700, 709.78)],
        "log": [np.abs(tiny(1e-300, 1e300)), uniform(0.5, 2), uniform(0.999, 1.001),
                1 + tiny(1e-16, 1e-6), np.abs(tiny(5e-324, 2.2e-308))],      # subnormals
        "log1p": [np.abs(tiny(1e-300, 1e300)), -np.abs(tiny(1e-300, 1)), uniform(-1, 1),
                  -1 + np.abs(tiny(1e-16, 1e-3)), tiny(1e-20, 1e-6)],
        "tanh": [uniform(-20, 20), uniform(-2, 2), tiny()],
        "sigmoid": [uniform(-745, 40), uniform(-5, 5), tiny()],
        "softplus": [uniform(-745, 709), uniform(-5, 5), tiny()],
    }
    return np.concatenate(sets[name])


def _ulps(y, ref):
    """(|y - ref| in ulps of ref rounded to y's dtype where that is finite, where it is,
    ref rounded)."""
    with np.errstate(over="ignore"):
        rounded = ref.astype(y.dtype)
    finite = np.isfinite(rounded)
    spacing = np.spacing(np.abs(rounded[finite])).astype(REF)
    return np.abs(y[finite].astype(REF) - ref[finite]) / spacing, finite, rounded


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_float64_within_bound_of_reference(name):
    x = _arguments(name)
    with np.errstate(all="ignore"):
        ref = REFERENCE[name](x.astype(REF))
    y = getattr(fm, name)(x)
    err, finite, rounded = _ulps(y, ref)
    assert float(err.max()) <= BOUND[name] + SLACK, x[finite][np.argmax(err)]
    assert np.array_equal(y[~finite], rounded[~finite])  # overflow to inf alike


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_float32_within_one_ulp_and_nearly_always_correctly_rounded(name):
    """Through float64: within 1 ulp, nearly always correctly rounded. The float32
    sigmoid (the default hidden layer's) computes in float32 for speed: within 2.5 ulp."""
    with np.errstate(all="ignore"):
        x = _arguments(name).clip(-3e38, 3e38).astype(np.float32)
        ref = REFERENCE[name](x.astype(REF))
    y = getattr(fm, name)(x)
    assert y.dtype == np.float32
    err, finite, rounded = _ulps(y, ref)
    native = name == "sigmoid"
    assert float(err.max()) <= (2.5 if native else 1.0), x[finite][np.argmax(err)]
    assert np.array_equal(y[~finite], rounded[~finite])
    assert np.mean(y == rounded) > (0.6 if native else 0.999)


def _math(name, value):
    """math.<name>(value), or None where it raises (overflow, outside the domain)."""
    try:
        return getattr(math, name)(value)
    except (OverflowError, ValueError):
        return None


@pytest.mark.parametrize("name", ["exp", "expm1", "log", "log1p", "tanh"])
def test_against_python_math(name):
    """Python's math module (the platform's libm, one float at a time) as a second
    reference, on a few hundred arguments: its own error is below 1 ulp, hence one more."""
    for value in _arguments(name, 60).tolist():
        expected = _math(name, value)
        if expected is not None:
            got = float(getattr(fm, name)(np.array(value)))
            assert abs(got - expected) <= (BOUND[name] + 1) * np.spacing(abs(expected)), value
        value32 = np.float32(value) if abs(value) < 1e38 else np.float32(0)
        expected = _math(name, float(value32))
        if value32 != 0 and expected is not None and abs(expected) < 1e38:
            got32 = getattr(fm, name)(np.array(value32))
            expected32 = np.float32(expected)
            assert abs(float(got32) - float(expected32)) <= np.spacing(abs(expected32)), value


INF, NAN, TINY = np.inf, np.nan, 5e-324
SPECIAL = {
    "exp": [(0.0, 1.0), (-0.0, 1.0), (INF, INF), (-INF, 0.0), (NAN, NAN), (709.79, INF),
            (1e300, INF), (-745.2, 0.0), (-1e300, 0.0), (-745.0, TINY), (1e-300, 1.0)],
    "expm1": [(0.0, 0.0), (-0.0, -0.0), (INF, INF), (-INF, -1.0), (NAN, NAN), (709.79, INF),
              (-40.0, -1.0), (-1e300, -1.0), (TINY, TINY), (-TINY, -TINY)],
    "log": [(0.0, -INF), (-0.0, -INF), (1.0, 0.0), (-1.0, NAN), (-TINY, NAN), (-INF, NAN),
            (INF, INF), (NAN, NAN), (TINY, -744.4400719213812)],
    "log1p": [(0.0, 0.0), (-0.0, -0.0), (-1.0, -INF), (-2.0, NAN), (-INF, NAN), (INF, INF),
              (NAN, NAN), (TINY, TINY), (-TINY, -TINY), (1e-300, 1e-300)],
    "tanh": [(0.0, 0.0), (-0.0, -0.0), (INF, 1.0), (-INF, -1.0), (NAN, NAN), (20.0, 1.0),
             (-20.0, -1.0), (1e300, 1.0), (TINY, TINY), (-1e-300, -1e-300)],
    "sigmoid": [(0.0, 0.5), (-0.0, 0.5), (INF, 1.0), (-INF, 0.0), (NAN, NAN), (40.0, 1.0),
                (-745.0, TINY), (-800.0, 0.0), (1e300, 1.0), (-1e300, 0.0)],
    "softplus": [(0.0, math.log(2)), (INF, INF), (-INF, 0.0), (NAN, NAN), (1000.0, 1000.0),
                 (-1000.0, 0.0), (-745.0, TINY), (1e300, 1e300)],
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_special_values(name, dtype):
    """Exact results, signed zeros included, and no warning even with errors raising.
    In float32, the arguments float32 cannot hold are left out."""
    x = np.array([a for a, _ in SPECIAL[name]])
    expected = np.array([b for _, b in SPECIAL[name]])
    with np.errstate(all="ignore"):
        keep = (x.astype(dtype) == x) | ~np.isfinite(x)
        x, expected = x[keep].astype(dtype), expected[keep].astype(dtype)
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        y = getattr(fm, name)(x)
    assert y.dtype == dtype
    assert np.array_equal(y, expected, equal_nan=True), (x, y)
    assert np.array_equal(np.signbit(y[y == 0]), np.signbit(expected[expected == 0]))


def test_float32_range_limits():
    x = np.array([89.0, -89.0, -100.0, -103.0, -104.0, 88.7], np.float32)
    expected = np.array([np.inf, 0, 0, 0, 0, 0], np.float32)
    expected[1:] = np.exp(x[1:].astype(REF)).astype(np.float32)  # 88.7: finite; others subnormal
    assert np.array_equal(fm.exp(x), expected)
    assert 0 < fm.exp(x)[2] < np.finfo(np.float32).tiny and np.isfinite(fm.exp(x)[5])
    assert fm.expm1(x)[0] == np.inf and fm.softplus(x)[0] == 89 and fm.sigmoid(x)[3] > 0


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shapes_and_dtypes(shape, dtype):
    x = np.random.default_rng(0).normal(size=shape).astype(dtype)
    for name in ELEMENTWISE:
        y = getattr(fm, name)(x)
        assert y.shape == x.shape and y.dtype == dtype
        assert np.array_equal(y.reshape(-1), getattr(fm, name)(x.reshape(-1)), equal_nan=True)
    if x.ndim:
        for name in ["softmax", "log_softmax"]:
            y = getattr(fm, name)(x)
            assert y.shape == x.shape and y.dtype == dtype
        assert fm.row_sum(x).shape == x.shape[:-1] and fm.row_sum(x).dtype == dtype


def test_larger_than_a_block_and_strided():
    x = np.random.default_rng(1).normal(0, 5, (300, 100))
    for name in ELEMENTWISE:
        f = getattr(fm, name)
        rows = np.concatenate([f(row) for row in x[:, ::3]]).reshape(300, -1)
        assert np.array_equal(f(x[:, ::3]), rows, equal_nan=True)
    assert np.array_equal(fm.softmax(x[:, ::3]), np.stack([fm.softmax(row) for row in x[:, ::3]]))


def test_rejects_other_dtypes():
    with pytest.raises(TypeError):
        fm.exp(np.arange(3))


# -- row_sum, softmax ------------------------------------------------------------------

def _left_to_right(row):
    acc = row[0]
    for v in row[1:]:
        acc = acc + v  # not sum(): Python 3.12's sum() compensates
    return acc


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_sum_is_left_to_right(dtype):
    cancel = np.array([[1e16] + [1.0] * 15 + [-1e16]], np.float64)  # each +1 is lost
    assert fm.row_sum(cancel)[0] == 0.0 and cancel.sum(axis=-1)[0] != 0.0
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(64, 300)) * 10.0 ** rng.integers(-6, 7, (64, 300))).astype(dtype)
    got = fm.row_sum(x)
    assert got.dtype == dtype
    assert np.array_equal(got, np.array([_left_to_right(row) for row in x], dtype))
    assert not np.array_equal(got, x.sum(axis=-1))  # numpy's pairwise order differs
    assert np.array_equal(fm.row_sum(np.ones((2, 3, 0), dtype)), np.zeros((2, 3), dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_log_softmax(dtype):
    z = np.random.default_rng(3).normal(0, 4, (50, 10)).astype(dtype)
    p = fm.softmax(z)
    assert p.dtype == dtype and np.allclose(p.sum(axis=-1), 1, rtol=0, atol=10 * np.finfo(dtype).eps)
    ref = np.exp(z.astype(REF) - z.max(axis=-1, keepdims=True))
    ref /= ref.sum(axis=-1, keepdims=True)
    eps = np.finfo(dtype).eps
    assert np.allclose(p, ref, rtol=16 * eps, atol=0)
    assert np.allclose(fm.log_softmax(z), np.log(p.astype(np.float64)), rtol=4 * eps, atol=4 * eps)
    with np.errstate(all="raise"):
        big = np.array([[1000, -1000, 0], [-1000, -1000, -1000]], dtype)
        assert np.array_equal(fm.softmax(big)[0], [1, 0, 0])
        assert np.allclose(fm.softmax(big)[1], 1 / 3)
        assert np.array_equal(fm.log_softmax(big[:1, :2]), [[0, -2000]])


# -- the same bits everywhere ---------------------------------------------------------

CHILD = r"""
import hashlib, json, sys
import numpy as np
from distnn import fixedmath as fm
try:
    from numpy._core import _multiarray_umath as umath
except ImportError:  # numpy 1.x
    from numpy.core import _multiarray_umath as umath


def digest(y):
    y = np.where(np.isnan(y), np.array(np.nan, y.dtype), y)  # NaN sign/payload are not fixed
    return hashlib.sha256(np.ascontiguousarray(y).tobytes()).hexdigest()


x64 = np.load(sys.argv[1])
out = {"numpy": np.__version__, "fixedmath": {}, "numpy_own": {},
       "features": [f for f in umath.__cpu_dispatch__ if umath.__cpu_features__.get(f)]}
with np.errstate(all="ignore"):
    for dtype in (np.float32, np.float64):
        x = x64.astype(dtype)
        for name in ["exp", "expm1", "log", "log1p", "tanh", "sigmoid", "softplus"]:
            out["fixedmath"][f"{name}/{x.dtype}"] = digest(getattr(fm, name)(x))
            if hasattr(np, name):
                out["numpy_own"][f"{name}/{x.dtype}"] = digest(getattr(np, name)(x))
        rows = x.reshape(-1, 16)
        for name in ["softmax", "log_softmax", "row_sum"]:
            out["fixedmath"][f"{name}/{x.dtype}"] = digest(getattr(fm, name)(rows))
print(json.dumps(out))
"""


def _inputs():
    rng = np.random.default_rng(4)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, -5e-324, 2.2e-308, 1.0, -1.0,
               709.78, 710.0, -745.0, -746.0, 88.7, 89.0, -103.0, -104.0, 1e300, -1e300]
    x = np.concatenate([special, rng.normal(0, 3, 2000), rng.uniform(-750, 750, 2000),
                        np.exp(rng.uniform(-740, 700, 2000)), -rng.uniform(0, 1, 2000)])
    return x[:len(x) // 16 * 16]


def _child(inputs, features=None, numpy_path=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in [numpy_path, ROOT] if p)
    env.pop("NPY_DISABLE_CPU_FEATURES", None)
    if features:
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(features)
    done = subprocess.run([sys.executable, "-c", CHILD, str(inputs)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """(the inputs' file, the child's report with this numpy and every CPU feature on)."""
    inputs = tmp_path_factory.mktemp("fixedmath") / "x.npy"
    np.save(inputs, _inputs())
    return inputs, _child(inputs)


def test_same_bits_with_cpu_features_disabled(default_run):
    """Every function gives the same bits with numpy's SIMD loops switched off, while
    numpy's own exp, log, tanh... change (so the comparison could fail)."""
    inputs, default = default_run
    if not default["features"]:
        pytest.skip("this CPU has no feature numpy dispatches to")
    disabled = _child(inputs, default["features"])
    assert disabled["fixedmath"] == default["fixedmath"]
    assert not disabled["features"], f"numpy still reports {disabled['features']} on"
    changed = [k for k, v in default["numpy_own"].items() if disabled["numpy_own"][k] != v]
    print(f"numpy {default['numpy']} with {default['features']} disabled changes: {changed}")
    if not changed and platform.machine() in ("aarch64", "arm64"):
        pytest.skip(f"on {platform.machine()} numpy's own exp, log, tanh... depend on no CPU "
                    f"feature it can switch off (turning {default['features']} off changed none "
                    "of them): no contrast to show; distnn's bits matched")
    assert changed, "numpy's own functions gave the same bits: the switch had no effect"
    if {"X86_V4", "AVX512F", "AVX512_SKX"} & set(default["features"]):
        assert "exp/float64" in changed  # numpy's AVX-512 float64 exp against the libm's


def test_same_bits_on_numpy_1_24(default_run):
    if not (NP124 / "numpy").is_dir():
        pytest.skip(f"numpy 1.24 not installed at {NP124} (pip install --target {NP124} numpy==1.24.4)")
    inputs, here = default_run
    old = _child(inputs, numpy_path=NP124)
    assert old["numpy"].startswith("1.24")
    assert old["fixedmath"] == here["fixedmath"]
    assert _child(inputs, old["features"], numpy_path=NP124)["fixedmath"] == here["fixedmath"]
