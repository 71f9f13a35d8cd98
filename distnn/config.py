"""The training configuration: a dataclass built from command-line flags."""

import argparse
import dataclasses
import json
import math

import numpy as np

from data_prep.schema import PIXELS
from distnn import activations, losses, schedule
from distnn.errors import Parser, UserError
from distnn.files import regular_file
from distnn.progress import MODES

DEFAULT_DATA = "data/mnist.h5"
DTYPES = ("float32", "float64")
SEEDS = 2 ** 64  # seeds are 0 .. 2**64 - 1: the random streams' entropy (distnn.rng.Stream)


@dataclasses.dataclass
class Config:
    data: str = DEFAULT_DATA
    layers: tuple = (PIXELS, 256, 10)
    activation: str = "sigmoid"
    loss: str = "ce"
    positive_digit: int | None = None  # a digit 0-9: train it against the rest (one output unit)
    # the defaults reach 98 % test accuracy soonest on 2 ranks (measured: README, Performance)
    batch_size: int = 256
    lr: float = 1.5
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: float = 0.5
    decay_every: float = 0.0
    decay_factor: float = 0.1
    epochs: int = 15
    max_steps: int = 0
    seed: int = 0
    dtype: str = "float32"
    val_size: int = 5000
    train_limit: int = 0
    shuffle: bool = True
    stream: bool = False
    init: str = ""
    out: str = ""
    checkpoint_every: int = 500
    keep: int = 3
    resume: bool = False
    log_every: int = 100
    progress: str = "auto"
    quiet: bool = False

    @property
    def np_dtype(self):
        return np.dtype(self.dtype).type

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def describe(self):
        """The resolved configuration, one ``name = value`` per line."""
        return "\n".join(f"  {k:<16} = {v}" for k, v in dataclasses.asdict(self).items())


# Settings that change a run's numbers; a resumed run must match them. (The data
# file is compared by content, not path; epochs, max-steps, stream and the
# checkpoint settings may change between an interrupted run and its resumption.)
RESULT_FIELDS = ("layers", "activation", "loss", "positive_digit", "dtype", "batch_size",
                 "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup",
                 "decay_every", "decay_factor", "seed", "val_size", "train_limit", "shuffle")


def result_fields(config):
    """RESULT_FIELDS of a config (a dict), plus epochs when the cosine decays over them."""
    return RESULT_FIELDS + (("epochs",) if config.get("schedule") == "cosine" else ())


def differences(saved, current, fields=RESULT_FIELDS):
    """'--flag saved -> current' for each field that differs between two configs (dicts)."""
    out = []
    for name in fields:
        a, b = saved.get(name), current.get(name)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"--{name.replace('_', '-')} {fmt(a)} -> {fmt(b)}")
    return out


def fmt(value):
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _layers(text):
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of widths")
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need at least two positive widths")
    return widths


def build_parser():
    """distnn.train's parser, its defaults those of Config."""
    d = Config()
    p = Parser(
        prog="python -m distnn.train",
        description="Train an MLP with synchronous data-parallel SGD over MPI ranks; "
                    "the result is bit-identical for any number of ranks and on any machine "
                    "(any BLAS, CPU or supported numpy version, given IEEE-754 arithmetic).",
        epilog="Start ranks with 'python -m distnn.launcher -n N python -m distnn.train ...' "
               "(or launch/local.sh), which starts them the way the MPI beside this Python "
               "forwards SIGTERM/SIGUSR1 (stop with a checkpoint, exit 75): MPICH's mpiexec, "
               "Intel MPI's mpiexec.hydra (never its mpirun script: it forwards no signal), "
               "Open MPI's mpirun with each stop signal relayed as SIGUSR1 (it kills the "
               "ranks 0.25 s after a SIGTERM). See docs/clusters.md.")
    _task_flags(p, d)
    _optimizer_flags(p, d)
    _training_flags(p, d)
    _data_flags(p, d)
    _run_flags(p, d)
    return p


def _task_flags(p, d):
    """The data file, the network and its loss: what is trained on what."""
    p.add_argument("--data", default=d.data,
                   help=f"prepared HDF5 file (default {d.data}, prepared from the bundled MNIST if missing)")
    p.add_argument("--layers", type=_layers, default=d.layers,
                   help="layer widths, input first (default 784,256,10)")
    p.add_argument("--activation", default=d.activation, choices=list(activations.ACTIVATIONS),
                   help="hidden-layer activation (default sigmoid)")
    p.add_argument("--loss", default=d.loss, choices=list(losses.LOSSES),
                   help="output/loss pair: ce = softmax + cross-entropy, mse = sigmoid + "
                        "quadratic, bce = one sigmoid output + binary cross-entropy, for one "
                        "digit against the rest (--positive-digit) (default ce)")
    p.add_argument("--positive-digit", type=int, metavar="D",
                   help="train one digit against the rest: target 1 for digit D (0-9), 0 for "
                        "every other digit, one sigmoid output (--layers 784,1 or 784,64,1) "
                        "with --loss bce (or mse)")


def _optimizer_flags(p, d):
    """The batch, the SGD update and the learning-rate schedule."""
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"global mini-batch size, split across all ranks (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"learning rate: the peak rate of the schedule (default {d.lr})")
    p.add_argument("--momentum", type=float, default=d.momentum, metavar="MU",
                   help="momentum, 0 <= MU < 1: v = MU*v + g; w -= rate*v "
                        f"(default {d.momentum}; 0: plain SGD)")
    p.add_argument("--nesterov", action="store_true",
                   help="Nesterov momentum: w -= rate*(g + MU*v) (needs --momentum > 0)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, metavar="LAMBDA",
                   help="L2 regularisation of the weights (not the biases): the cost gains "
                        f"LAMBDA/2 * sum(w**2), so g += LAMBDA*w (default {d.weight_decay})")
    p.add_argument("--schedule", default=d.schedule, choices=list(schedule.SCHEDULES),
                   help="learning-rate schedule: constant; step (times --decay-factor every "
                        "--decay-every epochs); cosine (to zero at the last of --epochs) "
                        f"(default {d.schedule})")
    p.add_argument("--warmup", type=float, default=d.warmup, metavar="E",
                   help="linear warm-up over the first E epochs (fractions allowed): over its "
                        "W steps the rate rises as (step+1)/W times the schedule's "
                        f"(default {d.warmup}; 0: none)")
    p.add_argument("--decay-every", type=float, default=d.decay_every, metavar="E",
                   help="--schedule step: multiply the rate by --decay-factor every E epochs "
                        "(fractions allowed)")
    p.add_argument("--decay-factor", type=float, default=d.decay_factor, metavar="GAMMA",
                   help=f"--schedule step: the factor, 0 < GAMMA <= 1 (default {d.decay_factor})")


def _training_flags(p, d):
    """How long to train, the seed and the precision."""
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="stop after this many steps in total (default 0: no limit)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed for initialisation, validation split and shuffling (default 0)")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES),
                   help="parameter and compute precision (default float32)")


def _data_flags(p, d):
    """Which training rows are used, in what order, and how they are read."""
    p.add_argument("--val-size", type=int, default=d.val_size,
                   help=f"training images held out for validation, seeded (default {d.val_size}; 0 allowed)")
    p.add_argument("--train-limit", type=int, default=d.train_limit,
                   help="use only the first N training images (default 0: all)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="keep the training order instead of a seeded shuffle per epoch")
    p.add_argument("--stream", action="store_true",
                   help="read each rank's rows from the file every step instead of holding "
                        "the data set in memory")


def _run_flags(p, d):
    """The run's starting point, output folder, checkpoints, progress lines and resumption."""
    p.add_argument("--init", default=d.init,
                   help="start from the parameters in this model.h5 instead of a random init")
    p.add_argument("--out", default=d.out,
                   help="output folder (default runs/<timestamp>)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="write a checkpoint every N steps, besides each epoch end "
                        f"(default {d.checkpoint_every}; 0: epoch ends only)")
    p.add_argument("--keep", type=int, default=d.keep,
                   help=f"checkpoints to keep in <out>/checkpoints (default {d.keep})")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help="print a progress line every N steps where no bar is drawn "
                        f"(default {d.log_every}; 0: epoch lines only)")
    p.add_argument("--progress", choices=MODES, default=d.progress,
                   help="a tqdm bar or plain progress lines on rank 0; auto (default): a bar "
                        "only in a process on a terminal that no MPI launcher or srun started "
                        "(a launcher may give rank 0 a terminal while its output goes to a log)")
    p.add_argument("--quiet", action="store_true",
                   help="print only errors and the final line: no configuration, progress or epoch lines")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest valid checkpoint "
                        "(starts afresh if it has none)")


def from_args(args):
    """A Config from parsed arguments, with range checks (UserError on bad values)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in vars(args).items() if k in fields})
    check(config)
    return config


def check(config):
    positive = {"--batch-size": config.batch_size,
                "--lr": config.lr, "--epochs": config.epochs}
    for flag, value in positive.items():
        if not value > 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if not math.isfinite(config.lr):
        raise UserError(f"--lr must be a finite number, got {config.lr}")
    check_optimizer(config)
    if config.keep < 1:
        raise UserError(f"--keep must be at least 1, got {config.keep}")
    for flag, value in {"--seed": config.seed, "--max-steps": config.max_steps,
                        "--val-size": config.val_size,
                        "--train-limit": config.train_limit,
                        "--checkpoint-every": config.checkpoint_every,
                        "--log-every": config.log_every}.items():
        if value < 0:
            raise UserError(f"{flag} must be 0 or more, got {value}")
    if config.seed >= SEEDS:
        raise UserError(f"--seed must be below 2**64 ({SEEDS}), got {config.seed}")
    if config.layers[0] != PIXELS:
        raise UserError(f"--layers: the input width must be {PIXELS} (28x28 pixels), "
                        f"got {config.layers[0]}")
    check_task(config)
    regular_file(config.data, "--data")  # a FIFO would block the open for ever; missing: said later


def check_optimizer(config):
    """Momentum, weight decay and the schedule's flags: in range and consistent."""
    for flag, value in {"--momentum": config.momentum, "--weight-decay": config.weight_decay,
                        "--warmup": config.warmup, "--decay-every": config.decay_every,
                        "--decay-factor": config.decay_factor}.items():
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
    if not 0 <= config.momentum < 1:
        raise UserError(f"--momentum must be at least 0 and below 1, got {config.momentum}")
    if config.nesterov and config.momentum == 0:
        raise UserError("--nesterov needs momentum: give --momentum MU with 0 < MU < 1")
    for flag, value in {"--weight-decay": config.weight_decay, "--warmup": config.warmup,
                        "--decay-every": config.decay_every}.items():
        if value < 0:
            raise UserError(f"{flag} must be 0 or more, got {value}")
    for flag, value in {"--warmup": config.warmup, "--decay-every": config.decay_every}.items():
        if value > config.epochs:
            raise UserError(f"{flag} {value:g} epochs is longer than the run "
                            f"(--epochs {config.epochs})")
    if not 0 < config.decay_factor <= 1:
        raise UserError(f"--decay-factor must be above 0 and at most 1, got {config.decay_factor}")
    if config.schedule == "step":
        if not config.decay_every:
            raise UserError("--schedule step needs --decay-every E: the epochs between decays")
    elif config.decay_every:
        raise UserError(f"--decay-every applies to --schedule step, not {config.schedule}")


def check_task(config):
    """Ten digits (softmax or sigmoid outputs), or one digit against the rest (one output)."""
    digit, width = config.positive_digit, config.layers[-1]
    if digit is not None and not 0 <= digit <= 9:
        raise UserError(f"--positive-digit must be a digit 0-9, got {digit}")
    if config.loss == "bce" and width != 1:
        raise UserError(f"--loss bce trains one digit against the rest with one output unit, so "
                        f"the output width must be 1 (e.g. --layers 784,1 or 784,64,1), got {width}")
    if digit is None:
        if config.loss == "bce":
            raise UserError("--loss bce trains one digit against the rest: name it with "
                            "--positive-digit D (0-9)")
        if width != 10:
            raise UserError(f"--layers: MNIST has 10 classes, so the output width must be 10 "
                            f"(or 1 with --positive-digit D), got {width}")
        return
    if config.loss == "ce":
        raise UserError(f"--positive-digit {digit} needs a sigmoid output: use --loss bce (or mse); "
                        "softmax over one output is always 1")
    if width != 1:
        raise UserError(f"--positive-digit {digit} trains one output unit, so the output width "
                        f"must be 1 (e.g. --layers 784,1 or 784,64,1), got {width}")
