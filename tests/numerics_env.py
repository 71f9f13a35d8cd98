"""Environments to run distnn under in a subprocess, each varying something that must not
change its bits: numpy's SIMD code paths, or the numpy version (the oldest supported).
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are kept as the machine has them: on some
processors older OpenBLAS builds compute wrong results or crash without them."""

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from conftest import ROOT, run_env

# the newest patch release of the oldest numpy minor version pyproject.toml allows
OLDEST_NUMPY = "1.24.4"

# run in a child: numpy's version and its __cpu_features__, on numpy 1.x or 2.x
_REPORT = """
import json, numpy
try:
    from numpy._core import _multiarray_umath as m
except ImportError:
    from numpy.core import _multiarray_umath as m
print(json.dumps({"version": numpy.__version__, "features": m.__cpu_features__}))
"""


def numpy_report(env):
    """{"version": ..., "features": {name: on}} as numpy reports them in a child run in ``env``."""
    done = subprocess.run([sys.executable, "-c", _REPORT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def simd_off_env(base=None):
    """``base`` (default ``run_env()``) with NPY_DISABLE_CPU_FEATURES naming every
    dispatchable CPU feature numpy can use on this machine; None when it has none (the
    caller skips)."""
    try:
        from numpy._core import _multiarray_umath as m
    except ImportError:
        from numpy.core import _multiarray_umath as m
    features = [f for f in m.__cpu_dispatch__ if m.__cpu_features__.get(f)]
    if not features:
        return None
    return {**(run_env() if base is None else base), "NPY_DISABLE_CPU_FEATURES": " ".join(features)}


def assert_simd_off(env):
    """Check in a child run in ``env`` that numpy reports every feature named in its
    NPY_DISABLE_CPU_FEATURES off; return those names."""
    names = env["NPY_DISABLE_CPU_FEATURES"].split()
    features = numpy_report(env)["features"]
    still_on = [f for f in names if features.get(f, True)]
    assert not still_on, f"NPY_DISABLE_CPU_FEATURES did not turn off {still_on}"
    return names


def oldest_numpy_env(base=None):
    """(env, version): ``base`` (default ``run_env()``) with the oldest supported numpy
    first on PYTHONPATH.

    That numpy is installed once (``pip install --no-deps --target``) into a cache folder
    that outlives test runs; a failed install (no network) raises with pip's last line."""
    oldest = oldest_supported_numpy()
    if not OLDEST_NUMPY.startswith(oldest + "."):
        raise AssertionError(f"pyproject.toml needs numpy>={oldest} but OLDEST_NUMPY is "
                             f"{OLDEST_NUMPY}: set it to {oldest}'s newest patch release")
    target = cached_numpy(OLDEST_NUMPY)
    env = dict(run_env() if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    return env, OLDEST_NUMPY


def oldest_supported_numpy():
    """"X.Y" of the ``numpy>=X.Y`` dependency in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in project["dependencies"]:
        found = re.fullmatch(r"numpy\s*>=\s*(\d+\.\d+)(\.\d+)?", dependency.strip())
        if found:
            return found[1]
    raise AssertionError("pyproject.toml has no numpy>=X.Y dependency")


def cached_numpy(version):
    """The folder holding numpy ``version`` for this Python, installed on first use.

    The install goes into a temporary folder renamed into place when complete, so a killed
    install leaves no half folder; a lock makes concurrent test processes install it once."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distnn-tests"
    name = f"numpy-{version}-{sys.implementation.cache_tag}-{os.uname().machine}"
    target = cache / name
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():                        # another process installed it meanwhile
            return target
        for stale in cache.glob(f".{name}-*"):     # left by a killed install
            shutil.rmtree(stale, ignore_errors=True)
        temporary = tempfile.mkdtemp(prefix=f".{name}-", dir=cache)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                               "--only-binary=:all:", "--disable-pip-version-check",
                               "--no-input", "--target", temporary, f"numpy=={version}"],
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            shutil.rmtree(temporary, ignore_errors=True)
            lines = done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["?"]
            raise RuntimeError(f"could not install numpy=={version} for the oldest-numpy "
                               f"tests (PyPI needed once): {lines[-1]}")
        os.rename(temporary, target)
    return target
