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
from pathlib import Path

from distnn.config import differences, result_fields
from distnn.errors import TRAIN, UserError, warn
from distnn.rundir import checkpoint, modelfile
from distnn.files import write_json
from distnn.rundir.metrics import MetricsLog

LOCK = ".lock"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MODEL = "model.h5"
SUMMARY = "summary.json"
RUN_FILES = (SUMMARY, METRICS, CHECKPOINTS)  # any of them: the folder holds a run


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


def read_metrics(folder):
    """(metrics records, settings) of a run folder; UserError when it holds none."""
    folder = Path(folder)
    metrics = folder / METRICS
    if not folder.is_dir():
        raise UserError(f"{folder}: no such run folder")
    if not metrics.exists():
        raise UserError(f"{folder}: no {METRICS} (not a distnn run folder, or no epoch finished)")
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        config = json.loads((folder / CONFIG).read_text()) if (folder / CONFIG).exists() else {}
    except json.JSONDecodeError as exc:
        raise UserError(f"{folder}: unreadable metrics or config ({exc})") from None
    if not records:
        raise UserError(f"{metrics}: holds no epochs yet")
    return records, config


def read_summary(folder):
    """The summary of a complete run, or None (not finished, or not a JSON object)."""
    try:
        summary = json.loads((Path(folder) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def started(folder):
    """Whether a run began in ``folder`` (it has any of :data:`RUN_FILES`)."""
    return any((Path(folder) / name).exists() for name in RUN_FILES)


def resume_state(cfg, fingerprint):
    """The state of the newest valid checkpoint in ``cfg.out`` to continue, if
    ``cfg.resume`` and there is one (else None); UserError for a checkpoint whose
    result-changing settings or data differ from this run's (rank 0 calls this)."""
    if not cfg.resume:
        return None
    folder = Path(cfg.out) / CHECKPOINTS
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
        print(f"{TRAIN}: resuming from {path} (step {state.step}, epoch {state.epoch})", flush=True)
    return state
