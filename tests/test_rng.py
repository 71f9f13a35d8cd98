"""distnn.rng: sound statistics, determinism, and the same bits under the oldest supported
numpy and with numpy's SIMD paths off."""

import hashlib
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from distnn.rng import Stream
from numerics_env import assert_simd_off, oldest_numpy_env, simd_off_env


def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_uniform_statistics():
    u = Stream(1).uniform(100_000)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.0046                 # 5 standard errors
    assert abs(u.std() - 12 ** -0.5) < 0.002
    assert np.all(u * 2.0 ** 53 == np.floor(u * 2.0 ** 53))   # on the 2**-53 grid


def test_uniform_range():
    u = Stream(2).uniform((300, 4))
    x = Stream(2).uniform_range(-3.0, 5.0, (300, 4))
    assert x.shape == (300, 4) and x.min() >= -3.0 and x.max() <= 5.0
    assert digest(x) == digest(-3.0 + 8.0 * u)


@pytest.mark.parametrize("std", [1.0, 0.05])
def test_normal_statistics(std):
    z = Stream(3).normal(100_001, std) / std
    assert z.shape == (100_001,) and np.isfinite(z).all()
    assert abs(z.mean()) < 0.016                        # 5 standard errors
    assert abs(z.std() - 1.0) < 0.011
    assert abs(np.mean(np.abs(z) > 1.959964) - 0.05) < 0.0035
    assert abs(np.mean(z ** 4) - 3.0) < 0.15             # kurtosis of a normal


def test_shapes_and_empty_draws():
    s = Stream(4)
    assert s.normal((3, 5), 2.0).shape == (3, 5) and s.normal(7).shape == (7,)
    assert s.normal(0).shape == s.uniform(0).shape == s.permutation(0).shape == (0,)
    assert s.choice(5, 0).shape == (0,)


def test_permutation_is_a_uniform_permutation():
    p = Stream(5).permutation(60_000)
    assert p.dtype == np.int64 and np.array_equal(np.sort(p), np.arange(60_000))
    counts = np.bincount([Stream(seed).permutation(10)[0] for seed in range(2000)], minlength=10)
    chi2 = ((counts - 200.0) ** 2 / 200.0).sum()
    assert chi2 < 27.9, counts                          # chi-square, 9 dof, p = 0.001


def test_choice():
    c = Stream(6).choice(10_000, 500)
    assert c.dtype == np.int64 and len(np.unique(c)) == 500 and 0 <= c.min() and c.max() < 10_000
    assert np.array_equal(c, Stream(6).permutation(10_000)[:500])
    with pytest.raises(ValueError):
        Stream(6).choice(3, 4)


def test_same_entropy_same_bits_and_different_entropy_different_bits():
    def draws(entropy):
        s = Stream(entropy)
        return [digest(s.uniform(50)), digest(s.normal(50)), digest(s.permutation(50))]
    assert draws((0, 1)) == draws((0, 1)) and draws(5) == draws((5,))
    # numpy's SeedSequence alone would give 1 and (1, 0), and 2**32 and (0, 1), one stream
    runs = [draws(e) for e in [0, 1, (0, 1), (0, 2), (1, 0), 2 ** 32, (0, 0), 2 ** 64 - 1]]
    assert len({d for run in runs for d in run}) == 3 * len(runs)
    for bad in (-1, 2 ** 64, (3, -1)):
        with pytest.raises(ValueError):
            Stream(bad)
    s = Stream(9)
    assert digest(s.uniform(8)) != digest(s.uniform(8))     # each call takes new bits


def test_fixed_bits():
    """The draws that use no transcendental function, pinned: a change to the transforms
    changes every seeded result distnn produces."""
    s = Stream(7)
    assert [digest(s.uniform(1000)), digest(s.uniform_range(-3.0, 5.0, (10, 10))),
            digest(s.permutation(1000)), digest(s.choice(60_000, 100))] == [
        "210dd42cdb454a948231976c3db38a786f8294f1dbd67895f0fc7d1a71a348bb",
        "f781b2709d995dd50aecc81886d09eba0862ce68fcbb6befb92788791332d084",
        "9f516883b0c5e81700f99911580f7aaeaaadc9d9d3d2851e83e6a383104b8743",
        "de831ae8cbfa06e6ce4cbaaa1f607ea8b4b2e3705abca4296303c50ba5111a4c"]


def draw_digests():
    """SHA-256 of each kind of draw, run here and in the subprocesses below."""
    import hashlib
    import numpy
    from distnn.rng import Stream
    s = Stream((2026, 3))
    draws = {"uniform": s.uniform(1001), "uniform_range": s.uniform_range(-0.3, 0.7, (33, 31)),
             "normal": s.normal(100_001, 0.05), "normal_2d": s.normal((3, 5)),
             "permutation": s.permutation(60_000), "choice": s.choice(10_000, 16)}
    return numpy.__version__, {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in draws.items()}


def digests_in(env):
    code = f"import json\n{inspect.getsource(draw_digests)}\nprint(json.dumps(draw_digests()))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_same_bits_with_the_oldest_supported_numpy():
    env, version = oldest_numpy_env()
    here = draw_digests()[1]
    there_version, there = digests_in(env)
    assert there_version == version
    assert there == here


def test_same_bits_with_numpy_simd_off():
    env = simd_off_env()
    if env is None:
        pytest.skip("numpy dispatches to no optional CPU feature on this machine")
    assert_simd_off(env)
    assert digests_in(env)[1] == draw_digests()[1]
