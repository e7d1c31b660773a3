"""Per-image calibration: conformal intervals, flags, AUROC, retrieval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spe.per_image import (
    IntensityDescriptor,
    PerImageEstimate,
    PerImageMap,
    apply_per_image_map,
    auroc,
    fit_per_image_map,
    flag_state,
    nearest,
)


def synthetic_scores(rng, n, k=4, noise=0.05):
    """Sorted top-k scores whose best one tracks a real Dice with noise."""
    real = rng.uniform(0.3, 0.95, n)
    best = np.clip(real + rng.normal(0, noise, n), 0, 1)
    scores = np.sort(best[:, None] - rng.uniform(0, 0.1, (n, k)), axis=1)[:, ::-1]
    return scores, real


def test_conformal_quantile_rank():
    fitted = PerImageMap("max", [1.0], 0.0, [0.1 * i for i in range(1, 10)], 10)
    # n = 9 residuals: the 90% interval takes the ceil(10 * 0.9) = 9th.
    assert fitted.half_width(0.9) == pytest.approx(0.9)
    assert fitted.half_width(0.5) == pytest.approx(0.5)  # ceil(5) = 5th
    # Coverage beyond what n points can certify gives an unbounded interval.
    assert fitted.half_width(0.95) == np.inf


@pytest.mark.parametrize("aggregate", ["max", "topk"])
def test_conformal_intervals_cover_new_cases(aggregate):
    rng = np.random.default_rng(0)
    scores, real = synthetic_scores(rng, 2000)
    fitted = fit_per_image_map(scores, real, np.arange(2000), aggregate=aggregate)
    new_scores, new_real = synthetic_scores(rng, 4000)
    estimates = apply_per_image_map(fitted, "dice", new_scores, coverage=0.9)
    inside = np.mean(
        [e.low <= r <= e.high for e, r in zip(estimates, new_real, strict=True)]
    )
    assert 0.88 <= inside <= 0.92
    errors = np.abs([e.estimate for e in estimates] - new_real)
    assert errors.mean() < 0.06


def test_groups_stay_on_one_side_of_the_split():
    rng = np.random.default_rng(1)
    scores, real = synthetic_scores(rng, 40)
    groups = np.repeat(np.arange(10), 4)  # 10 cases x 4 checkpoints
    fitted = fit_per_image_map(scores, real, groups, aggregate="max")
    # Half of the 10 cases (20 points) fit, the other half's 20 give residuals.
    assert fitted.n_fit == 20 and len(fitted.residuals) == 20


def test_flags():
    def estimate(value, low, high):
        return PerImageEstimate(value, low, high, value)

    assert flag_state(estimate(0.6, 0.5, 0.7), 0.7, "dice") == "below"
    assert flag_state(estimate(0.75, 0.65, 0.85), 0.7, "dice") == "uncertain"
    assert flag_state(estimate(0.9, 0.8, 0.95), 0.7, "dice") == "ok"
    # For a distance, larger is worse.
    assert flag_state(estimate(12.0, 8.0, 15.0), 10.0, "hd95") == "below"
    assert flag_state(estimate(5.0, 3.0, 11.0), 10.0, "hd95") == "uncertain"


def test_auroc_by_hand():
    # Positives score 0.9 and 0.4; negatives 0.5, 0.2, 0.4 (a tie).
    scores = [0.9, 0.4, 0.5, 0.2, 0.4]
    positives = [True, True, False, False, False]
    # Pairs won: 0.9 beats 3; 0.4 beats 0.2, ties 0.4, loses to 0.5 -> 1.5.
    assert auroc(scores, positives) == pytest.approx(4.5 / 6)
    assert auroc([0.1, 0.2], [True, True]) is None


def test_retrieval_finds_the_image_itself_first():
    rng = np.random.default_rng(2)
    pool = torch.from_numpy(rng.random((20, 1, 32, 32)).astype(np.float32))
    descriptor = IntensityDescriptor(size=8)
    vectors = descriptor(pool)
    brighter = descriptor(pool[[3, 7]] * 0.5 + 0.2)  # contrast changes don't matter
    assert nearest(brighter, vectors, 3)[:, 0].tolist() == [3, 7]
