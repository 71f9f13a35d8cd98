"""The run folder (``--out``): its layout, and reading and writing it.

One run owns one folder; everything it leaves is here::

    <out>/.lock                  held while a run uses the folder (claim)
    <out>/config.json            the settings, as distnn.train printed them
    <out>/metrics.jsonl          one record per epoch, epoch 0 first (metrics)
    <out>/checkpoints/ckpt-<step>.h5   the newest --keep states (checkpoint)
    <out>/model.h5               the trained parameters (modelfile)
    <out>/summary.json           written last: the run is complete

Rank 0 claims the folder (:mod:`distnn.rundir.claim`) and writes it through
:class:`RunFiles`; every file appears whole or not at all
(:mod:`distnn.files`). Plots, sweeps and predictions read runs back
through the readers here.
"""

import dataclasses
import json
import os
import stat
from pathlib import Path

from distnn.config import differences, result_fields
from distnn.errors import TRAIN, UserError, warn
from distnn.files import reason, regular_file, write_json
from distnn.rundir import checkpoint, modelfile
from distnn.rundir.metrics import MetricsLog
from distnn.state import RunShape, misfit

LOCK = ".lock"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MODEL = "model.h5"
SUMMARY = "summary.json"
RUN_FILES = (SUMMARY, METRICS, CHECKPOINTS)  # any of them: the folder holds a run
LARGEST = 10 ** 15  # an epoch or a metric beyond this is not a run's (a figure's axes overflow)


class RunFiles:
    """Rank 0's writes to the run folder ``path``."""

    def __init__(self, path, config_json, data_fingerprint, keep):
        self.path = Path(path)
        self.config_json, self.data_fingerprint, self.keep = config_json, data_fingerprint, keep
        self.metrics = MetricsLog(self.path / METRICS)

    def start(self, history):
        """The settings, and the metrics so far (a resumed run drops lines past its
        checkpoint)."""
        self.metrics.rewrite(history)
        write_json(self.path / CONFIG, json.loads(self.config_json))

    def save_checkpoint(self, state):
        """A checkpoint of ``state``, keeping the newest ``keep``; returns its path."""
        return checkpoint.save(self.path / CHECKPOINTS, state, self.config_json,
                               self.data_fingerprint, self.keep)

    def finish(self, params, cfg, summary):
        """The trained model, then the summary that marks the run complete."""
        modelfile.save_model(self.path / MODEL, params, cfg.layers, cfg.activation, cfg.loss,
                             cfg.positive_digit)
        write_json(self.path / SUMMARY, summary)


def read_bytes(path):
    """The bytes of the run file ``path``, or None if there is none. It must be a regular
    file, not a symlink placed there (UserError); one swapped in after that check is
    still neither followed nor blocked on (``O_NOFOLLOW``, ``O_NONBLOCK``)."""
    regular_file(path, "cannot read", follow=False)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {reason(exc)}") from None
    with open(fd, "rb") as f:
        return f.read()


def utf8(data, path):
    """``data`` decoded; UserError naming the line of ``path`` that is not UTF-8."""
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path} line {line}: not UTF-8 text") from None


def parse_json(text, path, first_line=1):
    """The JSON value of ``text`` (line ``first_line`` on of ``path``); UserError naming
    the line when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = first_line + exc.lineno - 1
        raise UserError(f"{path} line {line}: not JSON ({exc.msg}, column {exc.colno})") from None
    except RecursionError:
        raise UserError(f"{path} line {first_line}: JSON nested too deeply") from None


def shown(value):
    """A value as it reads in JSON (NaN, "text", [1, 2]), cut to one short phrase."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_record(record, where, numbers):
    """UserError unless ``record`` is a JSON object with an integer epoch from 0 to LARGEST
    and each of ``numbers`` it holds null or a finite number of at most LARGEST in size."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: {shown(record)} is not a JSON object (a metrics record)")
    epoch = record.get("epoch")
    if "epoch" not in record:
        raise UserError(f"{where}: the record has no epoch")
    if type(epoch) is not int or not 0 <= epoch <= LARGEST:
        raise UserError(f"{where}: epoch {shown(epoch)} is not a whole number from 0 to {LARGEST:.0e}")
    for key in numbers:
        value = record.get(key)
        if value is not None and not (type(value) in (int, float) and abs(value) <= LARGEST):
            raise UserError(f"{where}: {key} {shown(value)} is not a finite number of at most "
                            f"{LARGEST:.0e} in size")


def read_metrics(folder, numbers=()):
    """(metrics records, settings) of a run folder; UserError, naming the file and line,
    when it holds none, or a record that is not a JSON object with an integer epoch
    (``numbers``: keys that must be null or finite numbers where present, such as those
    a figure draws), or settings that are not a JSON object."""
    folder = Path(folder)
    try:
        is_folder = stat.S_ISDIR(os.stat(folder).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_folder = False
    except OSError as exc:
        raise UserError(f"{folder}: {reason(exc)}") from None
    if not is_folder:
        raise UserError(f"{folder}: no such run folder")
    metrics, config_path = folder / METRICS, folder / CONFIG
    data = read_bytes(metrics)
    if data is None:
        raise UserError(f"{folder}: no {METRICS} (not a distnn run folder, or no epoch finished)")
    records = []
    for number, line in enumerate(utf8(data, metrics).split("\n"), 1):
        if line.strip():
            records.append(parse_json(line, metrics, number))
            check_record(records[-1], f"{metrics} line {number}", numbers)
    if not records:
        raise UserError(f"{metrics}: holds no epochs yet")
    data = read_bytes(config_path)
    config = {} if data is None else parse_json(utf8(data, config_path), config_path)
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: {shown(config)} is not a JSON object of settings")
    return records, config


def read_summary(folder):
    """The summary of a complete run, or None (not finished, or not a JSON object);
    UserError when summary.json is not a regular file (a FIFO would block for ever)."""
    data = read_bytes(Path(folder) / SUMMARY)
    try:
        summary = None if data is None else json.loads(data.decode())
    except (ValueError, RecursionError):
        return None
    return summary if isinstance(summary, dict) else None


def started(folder):
    """Whether a run began in ``folder`` (it has any of :data:`RUN_FILES`)."""
    return any((Path(folder) / name).exists() for name in RUN_FILES)


def resume_state(cfg, data):
    """The state of the newest checkpoint in ``cfg.out`` that verifies and fits this run
    (on ``data``, its Dataset), to continue, if ``cfg.resume`` and there is one (else None);
    rank 0 calls this, before any rank sizes a message from the state. A checkpoint that
    is damaged, not a regular file, or holds what this run never goes through
    (:func:`distnn.state.misfit`) is skipped with a warning; UserError for one whose
    result-changing settings or data differ from this run's, or that is past its end."""
    if not cfg.resume:
        return None
    folder = Path(cfg.out) / CHECKPOINTS
    run = RunShape.of(cfg, data.size("train"))

    def accept(path, state, config_json, fingerprint):
        try:
            saved = json.loads(config_json)
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            raise checkpoint.CheckpointError(f"{path}: its settings are not a JSON object")
        diffs = differences(saved, dataclasses.asdict(cfg), result_fields(saved))
        if diffs:
            raise UserError(f"cannot resume from {path}: settings that change the result "
                            f"differ (checkpoint -> now): {', '.join(diffs)}")
        if fingerprint != data.fingerprint:
            raise UserError(f"cannot resume from {path}: it was trained on a different data "
                            f"file than {cfg.data}")
        problem = misfit(state, run)
        if problem:
            raise checkpoint.CheckpointError(f"{path}: does not fit this run: {problem}")
        if state.step > run.last_step:
            ends = f"--max-steps {cfg.max_steps}" if run.last_step == cfg.max_steps else \
                f"--epochs {cfg.epochs} of {run.steps_per_epoch} steps"
            raise UserError(f"cannot resume from {path}: it is at step {state.step}, past "
                            f"this run's end at step {run.last_step} ({ends})")

    try:
        found = checkpoint.load_latest(folder, warn, accept)
    except checkpoint.CheckpointError as exc:
        raise UserError(f"cannot resume: {exc}") from None
    if found is None:
        warn(f"--resume: no checkpoint in {folder}; starting from the beginning")
        return None
    path, state, _, _ = found
    if not cfg.quiet:
        print(f"{TRAIN}: resuming from {path} (step {state.step}, epoch {state.epoch})", flush=True)
    return state
