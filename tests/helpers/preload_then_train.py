"""Load the shared library named by DISTNN_TEST_PRELOAD (e.g. one that switches on
flush-to-zero, as a library built with -ffast-math does), then run distnn.train
with the given arguments: a rank whose arithmetic differs from IEEE-754's."""

import ctypes
import os
import runpy
import sys

ctypes.CDLL(os.environ["DISTNN_TEST_PRELOAD"])
sys.argv = ["distnn.train", *sys.argv[1:]]
runpy.run_module("distnn.train", run_name="__main__", alter_sys=True)
