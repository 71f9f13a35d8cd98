"""What a fresh run starts from: the data file and the initial parameters.

Each can fail on one rank alone (a missing file, a model that does not fit),
so the trainer runs them inside :func:`distnn.parallel.agree`: a problem on
any rank stops every rank with the same one-line error.
"""

from pathlib import Path

from distnn import model
from distnn.config import DEFAULT_DATA, fmt
from distnn.errors import TRAIN, UserError, warn
from distnn.rundir import modelfile


def prepare_default_data(cfg, comm):
    """Prepare the bundled MNIST at the default path if it is missing (rank 0)."""
    if comm.rank != 0 or cfg.data != DEFAULT_DATA or Path(cfg.data).exists():
        return
    from data_prep.__main__ import main as prepare
    if not cfg.quiet:
        print(f"{TRAIN}: {cfg.data} is missing; preparing it from the bundled MNIST", flush=True)
    if prepare(["--out", cfg.data]) != 0:
        raise UserError(f"{cfg.data}: could not prepare the bundled MNIST")


def initial_params(cfg):
    """Random init, or the parameters of ``--init``: a model file that
    :func:`distnn.rundir.modelfile.load_model` accepts, with the layers of ``--layers``."""
    if not cfg.init:
        return model.init_params(cfg.layers, cfg.seed, cfg.activation, cfg.np_dtype)
    params, attrs = modelfile.load_model(cfg.init, cfg.np_dtype, "--init")
    if attrs["layers"] != tuple(cfg.layers):
        raise UserError(f"--init {cfg.init}: its layers {fmt(attrs['layers'])} "
                        f"do not match --layers {fmt(cfg.layers)}")
    return params


def note_train_limit(cfg, data):
    """Say once when --train-limit asks for more training images than the file holds."""
    if cfg.train_limit > data.file_sizes["train"]:
        warn(f"--train-limit {cfg.train_limit}: {cfg.data} holds only "
             f"{data.file_sizes['train']} training images; using all of them")
