"""How good an estimator is, where the real values are known; and the baselines.

An estimator is scored over many points (checkpoints, conditions or images)
by the Pearson correlation between estimates and real values and by their
mean absolute error. Two naive estimators are computed next to the method so
that every evaluation shows whether it is worth its cost:

- ``training_score``: the metric the checkpoint scores on its own validation
  split, ignoring the target data;
- ``prediction_area``: a line fitted on the calibration set from the mean
  predicted foreground fraction to the real metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from spe.cases import CaseSet
from spe.metrics import class_mask


def pearson_r(estimates: Sequence[float], real: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side does not vary."""
    x = np.asarray(estimates, dtype=np.float64)
    y = np.asarray(real, dtype=np.float64)
    if x.size < 2 or x.std() < 1e-12 or y.std() < 1e-12:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def mean_absolute_error(estimates: Sequence[float], real: Sequence[float]) -> float:
    x = np.asarray(estimates, dtype=np.float64)
    y = np.asarray(real, dtype=np.float64)
    return float(np.abs(x - y).mean())


def score_estimator(
    estimates: Sequence[float], real: Sequence[float]
) -> dict[str, float | int | None]:
    """{"pearson_r", "mae", "n"} of estimates against real values."""
    return {
        "pearson_r": pearson_r(estimates, real),
        "mae": mean_absolute_error(estimates, real),
        "n": len(real),
    }


def interval_coverage(
    low: Sequence[float], high: Sequence[float], real: Sequence[float]
) -> float:
    """Fraction of real values inside their [low, high] interval."""
    lo, hi, y = (np.asarray(v, dtype=np.float64) for v in (low, high, real))
    return float(((lo <= y) & (y <= hi)).mean()) if y.size else math.nan


def foreground_fraction(
    predictions: CaseSet, classes: Sequence[int]
) -> dict[str, float]:
    """Mean fraction of pixels predicted as each class (and their mean)."""
    fractions = {
        str(label): float(
            np.mean([class_mask(case.mask, label).mean() for case in predictions.cases])
        )
        for label in classes
    }
    if len(classes) > 1:
        fractions["mean"] = float(np.mean(list(fractions.values())))
    return fractions
