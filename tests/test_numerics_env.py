"""The subprocess environments of numerics_env really vary what they say they vary."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from numerics_env import assert_simd_off, numpy_report, oldest_numpy_env, simd_off_env


def test_simd_off_env_turns_the_features_off():
    env = simd_off_env()
    if env is None:
        pytest.skip("numpy dispatches to no optional CPU feature on this machine")
    names = assert_simd_off(env)
    assert simd_off_env({"KEEP": "1"}) == {"KEEP": "1", "NPY_DISABLE_CPU_FEATURES": " ".join(names)}
    assert names and all(numpy_report(os.environ)["features"][f] for f in names)
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        assert env.get(key) == os.environ.get(key)


def test_oldest_numpy_env_imports_that_numpy_with_h5py_and_mpi4py():
    env, version = oldest_numpy_env()
    assert numpy_report(env)["version"] == version
    numpy_dir = env["PYTHONPATH"].split(os.pathsep)[0]
    assert oldest_numpy_env({"PYTHONPATH": "/x"})[0] == {"PYTHONPATH": numpy_dir + os.pathsep + "/x"}
    code = ("import numpy, h5py, mpi4py.MPI, distnn\n"
            "with h5py.File('mem', 'w', driver='core', backing_store=False) as f:\n"
            "    f['a'] = numpy.arange(5.0)\n"
            "    assert f['a'][:].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]\n"
            "print(numpy.__version__, numpy.__file__)")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    running, path = done.stdout.split()
    assert running == version
    assert not path.startswith(sys.prefix)
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        assert env.get(key) == os.environ.get(key)
