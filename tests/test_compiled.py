"""distnn.compiled: every numba twin gives the numpy reference's bits, over millions of
arguments and the special values (NaN, infinities, signed zeros, subnormal arguments and
results), for every shape and dtype the step uses.

The reference is the same function with its twin switched off (the module's
``_*_kernel`` set to None). Whole training runs on both paths are compared by
tests/test_numerics.py (the ``numpy-kernels`` variation) and test_train.py.
"""

import os

import numpy as np
import pytest

from distnn import batch, compiled, exact, fixedmath, model, optim, products, step

pytestmark = pytest.mark.skipif(compiled.ACTIVE != "numba", reason=(
    "the compiled path is switched off (DISTNN_KERNELS=numpy)"
    if os.environ.get("DISTNN_KERNELS") == "numpy" else "numba is not installed"))

TWINS = [(fixedmath, "_sigmoid32_kernel"), (fixedmath, "_softmax_kernel"),
         (products, "_peak_bits_kernel"), (products, "_split_kernel"),
         (products, "_unscale_kernel"), (exact, "_on_grid_kernel"),
         (optim, "_update_kernel"), (optim, "_update_rows_kernel"),
         (batch, "_pixel_columns_kernel")]


def reference(fn, *args, **kwargs):
    """fn(*args) with every twin switched off: the numpy reference."""
    saved = [getattr(module, name) for module, name in TWINS]
    try:
        for module, name in TWINS:
            setattr(module, name, None)
        return fn(*args, **kwargs)
    finally:
        for (module, name), twin in zip(TWINS, saved):
            setattr(module, name, twin)


def assert_same_bits(got, want):
    """Equal dtype, shape and bits; NaN where the other is NaN (its bits are not fixed)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    uint = f"u{got.dtype.itemsize}"
    differ = got[~nan].view(uint) != want[~nan].view(uint)
    assert not differ.any(), (got[~nan][differ][:5], want[~nan][differ][:5])


def test_every_twin_is_compiled_and_used():
    for module, name in TWINS:
        assert getattr(module, name) is not None, name


SPECIAL = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-40, -1e-40, 1e-38, -87.3,
           -88.7, -100.0, -103.9, -104.0, -104.1, -150.0, 3.4e38, -3.4e38, 17.0, 16.6, 0.5]


def float32_sweep(step=997):
    """Every ``step``-th float32 bit pattern: all exponents, both signs, NaNs and
    subnormals included (about 4.3 million values)."""
    return np.arange(0, 2**32, step, dtype=np.uint64).astype(np.uint32).view(np.float32)


def test_sigmoid32_over_every_exponent_and_the_special_values():
    rng = np.random.default_rng(0)
    x = np.concatenate([float32_sweep(), np.array(SPECIAL, np.float32),
                        *(rng.standard_normal(500_000).astype(np.float32) * s
                          for s in (1, 10, 100))])
    y = fixedmath.sigmoid(x)
    assert_same_bits(y, reference(fixedmath.sigmoid, x))
    assert (y[(x < -88) & (x > -103)] < np.finfo(np.float32).tiny).all()  # subnormal results
    assert_same_bits(fixedmath.sigmoid(x[:-(x.size % 7) or None].reshape(-1, 7)[:, ::2]),  # strided, 2-d
                     reference(fixedmath.sigmoid, x[:-(x.size % 7) or None].reshape(-1, 7)[:, ::2]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [1, 3, 10])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_rows(name, width, dtype):
    rng = np.random.default_rng(width)
    with np.errstate(over="ignore"):
        z = np.concatenate([rng.standard_normal((20_000, width)) * s
                            for s in (0.1, 3, 30, 300, 1e5)]).astype(dtype)
    z[0, 0], z[1, :], z[2, -1], z[3, :] = np.nan, np.inf, -np.inf, -1e30
    z[4, 0] = np.finfo(dtype).max
    z[5, :] = z[5, 0]                          # ties: the same largest value twice
    fn = getattr(fixedmath, name)
    assert_same_bits(fn(z), reference(fn, z))
    assert_same_bits(fn(z[:, ::-1]), reference(fn, z[:, ::-1]))  # not contiguous


def awkward(shape, dtype, seed):
    """Values of every magnitude with NaN, infinities, signed zeros and subnormals."""
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        x = (rng.standard_normal(shape) * 2.0 ** rng.integers(-160, 130, shape)).astype(dtype)
    flat = x.reshape(-1)
    special = [np.nan, np.inf, -np.inf, 0.0, -0.0, np.finfo(dtype).smallest_subnormal,
               -np.finfo(dtype).tiny, np.finfo(dtype).max][:flat.size]
    flat[:len(special)] = special
    rng.shuffle(flat)
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_peaks_and_exponents(dtype):
    for seed, shape in enumerate([(300, 7), (7, 300), (1, 1), (0, 5), (5, 0), (64, 64)]):
        x = awkward(shape, dtype, seed)
        for axis in (0, 1):
            assert_same_bits(products.abs_peaks(x, axis), reference(products.abs_peaks, x, axis))
            assert_same_bits(products.abs_peaks(x.T, axis),
                             reference(products.abs_peaks, x.T, axis))
        finite = np.nan_to_num(x, nan=1.0, posinf=2.0, neginf=-3.0)
        assert exact.exponent(finite) == reference(exact.exponent, finite)
    with pytest.raises(exact.NonFiniteError):
        exact.exponent(awkward((9, 9), dtype, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parts", [1, 2])
def test_split_and_on_grid(parts, dtype):
    rng = np.random.default_rng(parts)
    x = (rng.standard_normal((200, 30)) * 2.0 ** rng.integers(-30, 30, (200, 30))).astype(dtype)
    x[0, :3] = [0.0, -0.0, 0.5]
    for scale in (products.pow2(20 - products.peak_exponents(x, 1))[:, None],
                  products.pow2(21 - products.peak_exponents(x, 0))[None, :]):
        for a in (x, np.asfortranarray(x)):
            got, want = products.split(a, scale, 22, parts), \
                reference(products.split, a, scale, 22, parts)
            for g, w in zip(got, want, strict=True):
                assert_same_bits(g, w)
    for shift in (-3, 0, 17, 60):
        assert_same_bits(exact.on_grid(x, shift), reference(exact.on_grid, x, shift))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("integer", [False, True])
def test_products(integer, dtype):
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (50, 40)).astype(np.float64) if integer else \
        rng.standard_normal((50, 40)).astype(dtype)
    W = rng.standard_normal((40, 9)).astype(dtype)
    kwargs = dict(integer_bits=8, scale=1 / 255) if integer else {}
    assert_same_bits(products.product(a, W, dtype, **kwargs),
                     reference(products.product, a, W, dtype, **kwargs))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum, nesterov, decay", [
    (0.0, False, 0.0), (0.0, False, 1e-3), (0.9, False, 0.0), (0.9, True, 1e-3)])
@pytest.mark.parametrize("some_rows", [False, True])
def test_update(some_rows, momentum, nesterov, decay, dtype):
    """The update of every array, and of a first weight whose gradient holds only some
    rows (the batch's pixel columns), the others zero."""
    rng = np.random.default_rng(3)
    rows = np.array([0, 3, 4, 17, 29]) if some_rows else None

    def run():
        params = [(rng_state.standard_normal((30, 20)).astype(dtype), np.zeros(20, dtype)),
                  (rng_state.standard_normal((20, 3)).astype(dtype), np.zeros(3, dtype))]
        velocity = optim.zero_velocity(params, momentum)
        for t in range(5):
            grads = [(rng_state.standard_normal(W.shape).astype(dtype) * dtype(2.0 ** -t),
                      rng_state.standard_normal(b.shape).astype(dtype)) for W, b in params]
            grads[0][0][0, :2] = [0.0, -0.0]
            if some_rows:
                grads[0] = (grads[0][0][rows], grads[0][1])
            optim.update(params, grads, velocity, 0.7 / (t + 1), momentum, nesterov, decay,
                         first_rows=rows)
        return [a for pair in params + velocity for a in pair]

    rng_state = np.random.default_rng(rng.integers(1 << 30))
    seed = rng_state.bit_generator.state
    got = run()
    rng_state.bit_generator.state = seed
    want = reference(run)
    for g, w in zip(got, want, strict=True):
        assert_same_bits(g, w)


def test_pixel_columns_and_the_first_layer_mean():
    rng = np.random.default_rng(5)
    pixels = np.where(rng.random((40, 784)) < 0.2, rng.integers(1, 256, (40, 784)), 0)
    pixels = pixels.astype(np.uint8)
    columns = np.flatnonzero(pixels.any(axis=0))
    assert_same_bits(batch.pixel_columns(pixels, columns),
                     reference(batch.pixel_columns, pixels, columns))
    params = model.init_params((784, 16, 10), 0)
    sums = [(rng.integers(-2**40, 2**40, (len(columns), 16)).astype(np.float64),
             rng.integers(-2**40, 2**40, 16).astype(np.float64)),
            (rng.standard_normal((16, 10)), rng.standard_normal(10))]

    def mean(used_rows):
        return step.mean_gradients([(w.copy(), b.copy()) for w, b in sums], params, columns,
                                   40, used_rows)
    dense, rows = mean(False), mean(True)
    for (g, gb), (w, wb) in zip(dense, reference(mean, False), strict=True):
        assert_same_bits(g, w)
        assert_same_bits(gb, wb)
    assert_same_bits(rows[0][0], dense[0][0][columns])


def test_a_kernel_compiles_where_numba_cannot_cache_it():
    """A function numba finds no cache folder for (here: one without a source file, as
    in a read-only installation with no writable home) is compiled all the same."""
    namespace = {"np": np}
    exec("def twice(x, out):\n    for i in range(x.size):\n        out[i] = x[i] * 2.0\n",
         namespace)
    twice = compiled.kernel(namespace["twice"])
    out = np.empty(3)
    twice(np.arange(3.0), out)
    assert out.tolist() == [0.0, 2.0, 4.0]

