"""distnn.train's settings: each mistake is one UserError that says what is wrong.

In process, through the trainer's own parse (``distnn.train.parse``, on one
rank); tests/test_train.py launches two of them to see every rank end with
exit 2 and nothing written.
"""

import importlib

import pytest
from mpi4py import MPI

from distnn import train
from distnn.config import Config
from distnn.errors import UserError


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["--seed", "18446744073709551616"],
     "--seed must be below 2**64 (18446744073709551616), got 18446744073709551616"),
    (["--seed", str(10 ** 30)], f"--seed must be below 2**64 (18446744073709551616), got {10 ** 30}"),
    (["--data", "d" * 300], f"--data {'d' * 300}: File name too long"),
    (["--data", "/"], "--data /: is a folder, not a regular file"),
    (["--block-size", "8"], "unrecognized arguments: --block-size 8"),
    (["--layers", "784,8,9"], "output width must be 10"),
    (["--loss", "bce"], "--loss bce trains one digit against the rest with one output unit, so "
                        "the output width must be 1 (e.g. --layers 784,1 or 784,64,1), got 10"),
    (["--loss", "bce", "--layers", "784,1"], "name it with --positive-digit D (0-9)"),
    (["--loss", "bce", "--layers", "784,1", "--positive-digit", "10"],
     "--positive-digit must be a digit 0-9, got 10"),
    (["--loss", "bce", "--layers", "784,1", "--positive-digit", "-1"],
     "--positive-digit must be a digit 0-9, got -1"),
    (["--positive-digit", "3", "--layers", "784,1"], "needs a sigmoid output: use --loss bce"),
    (["--positive-digit", "3", "--loss", "mse"], "output width must be 1"),
    (["--layers", "784,1", "--loss", "mse"], "(or 1 with --positive-digit D), got 1"),
    (["--momentum", "-0.1"], "--momentum must be at least 0 and below 1, got -0.1"),
    (["--momentum", "1"], "--momentum must be at least 0 and below 1, got 1.0"),
    (["--momentum", "nan"], "--momentum must be a finite number, got nan"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs momentum: give --momentum MU with 0 < MU < 1"),
    (["--weight-decay", "-0.0001"], "--weight-decay must be 0 or more, got -0.0001"),
    (["--warmup", "3", "--epochs", "2"], "--warmup 3 epochs is longer than the run (--epochs 2)"),
    (["--schedule", "linear"], "argument --schedule: invalid choice: 'linear'"),
    (["--schedule", "step"], "--schedule step needs --decay-every E"),
    (["--schedule", "step", "--decay-every", "1", "--decay-factor", "2"],
     "--decay-factor must be above 0 and at most 1, got 2.0"),
    (["--decay-every", "1"], "--decay-every applies to --schedule step, not cosine"),
    (["--schedule", "step", "--decay-every", "1e308"],
     "--decay-every 1e+308 epochs is longer than the run (--epochs 15)"),
    (["--decay-factor", "-3"], "--decay-factor must be above 0 and at most 1, got -3.0"),
])
def test_each_bad_setting_is_one_line_naming_it(args, message):
    with pytest.raises(UserError) as caught:
        train.parse(["--data", "unused.h5", *args], MPI.COMM_SELF)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_good_settings_parse_to_the_config():
    cfg = train.parse(["--data", "d.h5", "--momentum", "0.5", "--schedule", "step",
                       "--decay-every", "2", "--seed", str(2 ** 64 - 1)], MPI.COMM_SELF)
    assert isinstance(cfg, Config) and cfg.momentum == 0.5 and cfg.decay_every == 2
    assert cfg.seed == 2 ** 64 - 1


@pytest.mark.parametrize("module", ["data_prep.__main__", "distnn.plot", "distnn.predict",
                                    "distnn.bench", "launch.sweep"])
def test_every_tools_flag_mistake_is_one_line_and_exit_2(module, capsys):
    main = importlib.import_module(module).main
    assert main(["--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "usage" not in err
