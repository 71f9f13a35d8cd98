"""Run distnn.train, but turn each rank's --data into a FIFO just after the trainer checked
that it is a regular file, as someone else could: the race that distnn.files.opening
guards against. The rank then blocks in open() until a stop signal ends the wait.

Usage: fifo_after_check.py [train flags...]. Each rank reads its own hard link
``<--data>.rank<r>`` of the data file, so each blocks on a FIFO of its own.
"""

import os
import runpy
import sys

import h5py

from distnn import data

argv = sys.argv[1:]
at = argv.index("--data") + 1
mine = f"{argv[at]}.rank{os.environ.get('PMI_RANK', '0')}"
os.link(argv[at], mine)
argv[at] = mine


class FifoAfterCheck:
    """h5py as distnn.data sees it, but whose File makes this rank's --data a FIFO first."""

    def __getattr__(self, name):
        return getattr(h5py, name)

    @staticmethod
    def File(path, *args, **kwargs):
        os.unlink(mine)
        os.mkfifo(mine)
        return h5py.File(path, *args, **kwargs)


data.h5py = FifoAfterCheck()
sys.argv = ["distnn.train", *argv]
runpy.run_module("distnn.train", run_name="__main__", alter_sys=True)
