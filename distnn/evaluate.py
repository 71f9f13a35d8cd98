"""Scoring parameters on a split across ranks.

Each rank scores its contiguous share of the split; the per-row statistics
are summed exactly (:class:`distnn.exact.ExactSum`), so the scores are the
same bits for any rank count. The output values are
:func:`distnn.model.output_values`, as prediction's (:mod:`distnn.predict`).
"""

import numpy as np

from distnn import model
from distnn.batch import share
from distnn.errors import Diverged
from distnn.exact import NonFiniteError

N_EVAL_STATS = 3   # per evaluated row: correct, quadratic cost, cross-entropy
SPLITS = ("val", "test")


def eval_stats(y, T):
    """Per-row correct, quadratic cost and cross-entropy; (rows, N_EVAL_STATS)."""
    return np.stack(model.metric_sums(y, T), axis=-1)


def evaluate(params, cfg, data, split, comm, reducer):
    """Accuracy, quadratic cost and cross-entropy on a split, scored across ranks (None if
    empty); ``reducer`` is an ``ExactSum([N_EVAL_STATS])`` on ``comm``."""
    n = data.size(split)
    if n == 0:
        return None
    pixels, T = share(data, split, np.arange(n), cfg, comm, np.float64)
    y = model.output_values(params, pixels, cfg.activation, cfg.loss)
    correct, quad, cross = reducer([eval_stats(y, T)], n)[0]
    return {"acc": correct / n, "quadratic_cost": quad / n, "cross_entropy": cross / n}


def evaluation(step, params, cfg, data, comm, reducer):
    """``val_*`` and ``test_*`` scores of the parameters after ``step`` steps, for a
    metrics record; Diverged (on every rank) if an output became NaN or infinite."""
    record = {}
    for split in SPLITS:
        try:
            scores = evaluate(params, cfg, data, split, comm, reducer) or {}
        except NonFiniteError:
            raise Diverged(f"training diverged by step {step}: the {split} outputs became "
                           "NaN or infinite; the last good checkpoint is kept; lower --lr",
                           agreed=True) from None
        for key, value in scores.items():
            record[f"{split}_{key}"] = value
    return record
