"""Everything a run does before its first step, on every rank.

The trainer runs the checks that can fail on one rank alone (preparing the
data, the initial parameters, the checkpoint to resume) inside
:func:`distnn.parallel.agree`, so a problem found on any rank (a missing file, a
mismatched setting) stops every rank with the same one-line error instead of
leaving some waiting in a collective call; the others are collective
themselves (``check_same_settings``, ``share_state``) or print only.
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from distnn import checkpoint, model, outputs
from distnn.config import DEFAULT_DATA, differences, fmt, result_fields
from distnn.errors import UserError
from distnn.step import N_STATS

PROG = "distnn.train"


def prepare_default_data(cfg, comm):
    """Prepare the bundled MNIST at the default path if it is missing (rank 0)."""
    if comm.rank != 0 or cfg.data != DEFAULT_DATA or Path(cfg.data).exists():
        return
    from data_prep.__main__ import main as prepare
    if not cfg.quiet:
        print(f"{PROG}: {cfg.data} is missing; preparing it from the bundled MNIST", flush=True)
    if prepare(["--out", cfg.data]) != 0:
        raise UserError(f"{cfg.data}: could not prepare the bundled MNIST")


def check_same_settings(comm, cfg, fingerprint):
    """Refuse to start when ranks were given different settings or data files."""
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "data"}
    everyone = comm.allgather((mine, fingerprint, cfg.data))
    settings0, fingerprint0, path0 = everyone[0]
    for rank, (settings, fp, path) in enumerate(everyone[1:], start=1):
        if fp != fingerprint0:
            raise UserError(f"rank {rank} reads a different data file ({path}) from rank 0 "
                            f"({path0}); every rank must use the same data", agreed=True)
        diffs = differences(settings0, settings, fields=sorted(settings0))
        if diffs:
            raise UserError(f"rank {rank} was started with different settings from rank 0 "
                            f"(rank 0 -> rank {rank}): {', '.join(diffs)}", agreed=True)


def initial_params(cfg):
    """Random init, or the parameters of ``--init`` (which must match ``--layers``)."""
    if not cfg.init:
        return model.init_params(cfg.layers, cfg.seed, cfg.activation, cfg.np_dtype)
    params, attrs = outputs.load_model(cfg.init, cfg.np_dtype)
    if attrs["layers"] != tuple(cfg.layers):
        raise UserError(f"--init {cfg.init}: its layers {fmt(attrs['layers'])} "
                        f"do not match --layers {fmt(cfg.layers)}")
    return params


def note_train_limit(cfg, data):
    """Say once when --train-limit asks for more training images than the file holds."""
    if cfg.train_limit > data.file_sizes["train"]:
        warn(f"--train-limit {cfg.train_limit}: {cfg.data} holds only "
             f"{data.file_sizes['train']} training images; using all of them")


def warn(message):
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def resume_state(cfg, fingerprint, comm):
    """On rank 0: the newest valid checkpoint's state, if resuming and there is one.

    Refuses a checkpoint whose result-changing settings or data differ from
    this run's. Other ranks return None.
    """
    if comm.rank != 0 or not cfg.resume:
        return None
    folder = Path(cfg.out) / "checkpoints"
    try:
        found = checkpoint.load_latest(folder, warn)
    except checkpoint.CheckpointError as exc:
        raise UserError(f"cannot resume: {exc}") from None
    if found is None:
        warn(f"--resume: no checkpoint in {folder}; starting from the beginning")
        return None
    path, state, config_json, data = found
    saved = json.loads(config_json)
    diffs = differences(saved, dataclasses.asdict(cfg), result_fields(saved))
    if diffs:
        raise UserError(f"cannot resume from {path}: settings that change the result differ "
                        f"(checkpoint -> now): {', '.join(diffs)}")
    if data != fingerprint:
        raise UserError(f"cannot resume from {path}: it was trained on a different data file "
                        f"than {cfg.data}")
    if not cfg.quiet:
        print(f"{PROG}: resuming from {path} (step {state.step}, epoch {state.epoch})", flush=True)
    return state


def shared(comm, params):
    """``params`` with rank 0's values on every rank (in place)."""
    for W, b in params:
        comm.Bcast(W, root=0)
        comm.Bcast(b, root=0)
    return params


def share_state(comm, state, params, velocity):
    """Make every rank hold rank 0's state; ``params`` and ``velocity`` (its zeros, [] without
    momentum) are this rank's arrays to fill."""
    meta = None
    if comm.rank == 0:
        if state is None:
            state = checkpoint.TrainState(params=params, velocity=velocity, totals=np.zeros(N_STATS))
        meta = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
                if f.name not in ("params", "velocity")}
        meta = json.dumps({**meta, "totals": [float(t) for t in meta["totals"]]})
    # as JSON, not pickled numpy objects: ranks may run different numpy versions
    meta = json.loads(comm.bcast(meta, root=0))
    held = shared(comm, state.params if comm.rank == 0 else params)
    moving = shared(comm, state.velocity if comm.rank == 0 else velocity)
    meta["totals"] = np.asarray(meta["totals"], np.float64)
    return checkpoint.TrainState(params=held, velocity=moving, **meta)
