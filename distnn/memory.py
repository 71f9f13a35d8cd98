"""Refuse, before allocating anything, a run whose arrays cannot fit in memory.

A network too wide (``--layers 784,100000000,10``: 80 billion weights) or a batch
too large would otherwise end in a MemoryError half way through start-up, or in
the kernel's OOM killer. :func:`check` estimates what one rank holds, from the
settings and the size of the data file (:func:`estimate`), and compares what the ranks on this
node need with the memory still available here (``MemAvailable`` and free swap
in ``/proc/meminfo``, or less if the process's cgroup sets a limit). The
estimate counts only the largest arrays, and only those held at the same time,
so it stays below what a run takes (measured against the resident memory runs
added after the check: 0.58 of it for the default network, 0.91 for
784,4096,4096,10 with 1024-row batches, 0.74 for 784,2048,10 with the whole
training set as one batch, 0.1-0.3 for small or single wide layers): it
refuses only runs that cannot fit.
"""

import math
import os
from pathlib import Path

from mpi4py import MPI

from data_prep.schema import DIGEST, PIXELS
from distnn.config import fmt
from distnn.errors import UserError
from distnn.model import EVAL_CHUNK

FILE_ROW = PIXELS + 1 + DIGEST  # bytes of one row in a data file: pixels, label, SHA-256
MASK_ROW = math.ceil(PIXELS / 8)  # the in-memory bit mask of a row's non-zero pixels
FLOAT64 = 8


def estimate(cfg, ranks=1):
    """{part: bytes} that one of ``ranks`` ranks holds at least at its peak, for the
    settings ``cfg``: what it keeps all run long (the parameters, the velocity, the
    exact gradient sums, the data) plus the largest of what comes and goes (a step's
    activations with one layer's weights on a grid, the gradients, an evaluation)."""
    size = 4 if cfg.dtype == "float32" else FLOAT64
    shapes = list(zip(cfg.layers[:-1], cfg.layers[1:]))
    n_params = sum(i * o + o for i, o in shapes)
    rows = data_rows(cfg.data)
    used = min(cfg.train_limit or rows, rows)
    units = sum(cfg.layers[1:])
    # a step: each unit's z and delta (float64) and activation, the pixels as float64
    step = math.ceil(min(cfg.batch_size, used) / ranks) * (units * (2 * FLOAT64 + size)
                                                          + PIXELS * FLOAT64)
    grid = max(i * o for i, o in shapes) * FLOAT64
    evaluation = min(EVAL_CHUNK, math.ceil(min(cfg.val_size, used) / ranks)) * units * (FLOAT64 + size)
    return {"parameters": n_params * ((2 if cfg.momentum else 1) * size + FLOAT64),
            "a step": max(step + grid, n_params * size, evaluation),
            # every row's label and SHA-256; without --stream, the images and pixel masks
            "data": rows * (1 + DIGEST) + (0 if cfg.stream else used * (PIXELS + MASK_ROW))}


def data_rows(path):
    """The rows a data file can hold at most, from its size (0 if it cannot be read)."""
    try:
        return os.stat(path).st_size // FILE_ROW
    except (OSError, ValueError):
        return 0


def available():
    """(bytes this process may still allocate, where the figure comes from), or None
    where the system does not say (no /proc/meminfo)."""
    found = []
    meminfo = read_meminfo()
    if "MemAvailable" in meminfo:
        found.append((meminfo["MemAvailable"] + meminfo.get("SwapFree", 0),
                      "MemAvailable and SwapFree in /proc/meminfo"))
    limit = cgroup_room()
    if limit is not None:
        found.append(limit)
    return min(found) if found else None


def read_meminfo(path="/proc/meminfo"):
    """/proc/meminfo as {name: bytes} ({} where there is none)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            values[name] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return values


def cgroup_room(root=Path("/sys/fs/cgroup"), own=Path("/proc/self/cgroup")):
    """(limit minus usage, the limit's file) for the tightest memory limit of this
    process's cgroup or its ancestors, v2 or v1, or None without one. A container sees
    its own cgroup at the mount itself, which is among the ancestors searched."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        hierarchy, controllers, relative = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            mount, names = root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            mount, names = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        folder = mount / relative.lstrip("/")
        rooms += filter(None, (limit_room(level, *names) for level in (folder, *folder.parents)
                               if level.is_relative_to(mount)))
    return min(rooms) if rooms else None


def limit_room(folder, limit_name, usage_name):
    """(limit minus usage, the limit's file) of one cgroup folder, or None without a limit
    ("max", or v1's near 2**63)."""
    try:
        limit = (folder / limit_name).read_text().strip()
        usage = int((folder / usage_name).read_text())
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= 2 ** 60:
        return None
    return int(limit) - usage, str(folder / limit_name)


def size_text(count):
    return f"{count / 1e9:.1f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def check(cfg, comm):
    """UserError naming both figures when the ranks of ``comm`` on this node cannot all
    hold their arrays in the memory available here. Collective: every rank calls it."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    here = node.size
    node.Free()
    parts = estimate(cfg, comm.size)
    need = sum(parts.values()) * here
    room = available()
    if room is None or need <= room[0]:
        return
    shares = ", ".join(f"{name} {size_text(value)}" for name, value in parts.items())
    who = (f"{here} ranks on this node need at least {size_text(need)} of memory "
           f"({size_text(need // here)} each: {shares})" if here > 1 else
           f"it needs at least {size_text(need)} of memory ({shares})")
    raise UserError(f"--layers {fmt(cfg.layers)} with --batch-size {cfg.batch_size} "
                    f"({cfg.dtype}): {who}, but only {size_text(room[0])} is available "
                    f"({room[1]}); use narrower layers, a smaller --batch-size or fewer "
                    "ranks per node")
