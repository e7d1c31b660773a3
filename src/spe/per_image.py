"""Per-image quality estimates with conformal intervals and failure flags.

Reverse classification accuracy, in-context: for one target image, the
support is that image with the model's prediction alone; the queries are the
k reference images most similar to it. If the prediction is good, the
segmenter transfers it well to at least some of those references, so the
best of the k scores tracks the image's real score. A calibration learned on
a labeled set maps the k sorted scores to an estimate (``"max"``: a line on
the best score, as published; ``"topk"``: a ridge regression on all k), and
split-conformal prediction gives an interval with the chosen coverage.

Limitation: per-image estimates are made for 2-D images only; 3-D volumes
get dataset-level estimates, and asking for per-image ones is an error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from spe.calibration import clip_metric
from spe.cases import CaseSet
from spe.errors import SPEError
from spe.intensity import standardize
from spe.metrics import HIGHER_IS_BETTER, binary_metrics, class_mask
from spe.segmenters import InContextSegmenter, PreparedImages
from spe.segmenters.base import resize_probabilities

logger = logging.getLogger(__name__)

PER_IMAGE_METRICS = ("dice", "jaccard", "precision", "recall", "pearson", "hd95")
AGGREGATES = ("max", "topk")
FLAG_STATES = ("below", "uncertain", "ok")


# ---------------------------------------------------------------------------
# Retrieval of similar reference images


class Descriptor(Protocol):
    """Maps prepared images (N, 1, H, W) in [0, 1] to vectors (N, D)."""

    name: ClassVar[str]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def settings(self) -> dict[str, Any]: ...


@dataclass
class IntensityDescriptor:
    """Downsampled intensities, standardised per image: needs no weights.

    Two images are similar when their ``size`` x ``size`` thumbnails
    correlate, which finds references with the same anatomy in the same
    place and is blind to global brightness and contrast.
    """

    size: int = 16
    name: ClassVar[str] = "intensity"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        thumbnails = F.adaptive_avg_pool2d(pixels, self.size).flatten(1)
        centred = thumbnails - thumbnails.mean(dim=1, keepdim=True)
        return F.normalize(centred, dim=1)

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size}


DESCRIPTORS: dict[str, Callable[..., Descriptor]] = {"intensity": IntensityDescriptor}


def make_descriptor(settings: dict[str, Any] | None = None) -> Descriptor:
    """A descriptor from its recorded settings (default: intensity, 16 x 16)."""
    settings = dict(settings or {"name": "intensity"})
    name = settings.pop("name")
    if name not in DESCRIPTORS:
        message = f"unknown descriptor {name!r}; choose one of {', '.join(DESCRIPTORS)}"
        raise SPEError(message)
    return DESCRIPTORS[name](**settings)


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (N, k) of the k most similar pool vectors (cosine), best first."""
    similarity = queries @ pool.T
    return similarity.topk(min(k, pool.shape[0]), dim=1).indices


# ---------------------------------------------------------------------------
# Reverse scores of single-image supports


@dataclass
class PerImageReference:
    """Reference images prepared for retrieval and single-image supports."""

    cases: CaseSet
    prepared: PreparedImages
    descriptors: torch.Tensor
    intensity: str = "minmax"


def prepare_per_image_reference(
    segmenter: InContextSegmenter,
    reference: CaseSet,
    descriptor: Descriptor,
    *,
    intensity: str = "minmax",
) -> PerImageReference:
    """Prepare every reference image once (retrieval needs the whole pool)."""
    if reference.is_volume:
        raise SPEError(
            "per-image estimates need 2-D images; 3-D volumes get dataset-level "
            "estimates only"
        )
    prepared = segmenter.prepare(
        standardize([case.image for case in reference.cases], intensity)
    )
    return PerImageReference(
        reference, prepared, descriptor(prepared.pixels), intensity
    )


def reverse_scores(
    segmenter: InContextSegmenter,
    reference: PerImageReference,
    target: CaseSet,
    label: int,
    *,
    k: int = 8,
    threshold: float = 0.5,
    hd95: str = "max",
    descriptor: Descriptor,
    pairs_per_call: int = 256,
    progress: Callable | None = None,
) -> np.ndarray:
    """Sorted reverse scores of every target case: (n_cases, k, n_metrics).

    For each target case, its image and predicted mask segment each of its k
    nearest reference images; the scores against those references' labels
    are sorted best first per metric (HD95 ascending, the rest descending).
    Metric order is :data:`PER_IMAGE_METRICS`.
    """
    if target.is_volume:
        raise SPEError(
            "per-image estimates need 2-D images; 3-D volumes get dataset-level "
            "estimates only"
        )
    support = segmenter.prepare(
        standardize([case.image for case in target.cases], reference.intensity)
    )
    support_masks = segmenter.prepare_masks(
        [class_mask(case.mask, label) for case in target.cases]
    )
    if k > len(reference.cases):
        logger.warning(
            "k = %d but the reference set has %d images; using all of them",
            k,
            len(reference.cases),
        )
    neighbours = nearest(descriptor(support.pixels), reference.descriptors, k)
    k = neighbours.shape[1]

    # All (target, reference) pairs, segmented in large batches.
    target_index = torch.arange(len(target)).repeat_interleave(k)
    reference_index = neighbours.flatten()
    scores = np.empty((len(target), k, len(PER_IMAGE_METRICS)))
    starts = range(0, len(target_index), pairs_per_call)
    for start in progress(starts) if progress else starts:
        chunk = slice(start, start + pairs_per_call)
        queries = reference.prepared.subset(reference_index[chunk])
        probabilities = segmenter.segment_paired(
            support.subset(target_index[chunk]),
            support_masks[target_index[chunk]],
            queries,
        )
        for offset, probability in enumerate(
            resize_probabilities(probabilities, queries.sizes)
        ):
            pair = start + offset
            case = reference.cases.cases[int(reference_index[pair])]
            values = binary_metrics(
                probability >= threshold,
                class_mask(case.mask, label),
                spacing=case.spacing,
                hd95=hd95,
            )
            scores[pair // k, pair % k] = [
                _finite_distance(values[m], probability.shape, case.spacing)
                for m in PER_IMAGE_METRICS
            ]

    # Best first, per metric.
    for column, metric in enumerate(PER_IMAGE_METRICS):
        ordered = np.sort(scores[:, :, column], axis=1)
        scores[:, :, column] = ordered[:, ::-1] if HIGHER_IS_BETTER[metric] else ordered
    return scores


def _finite_distance(
    value: float, shape: Sequence[int], spacing: Sequence[float]
) -> float:
    """An infinite distance counts as the image diagonal, as in every mean."""
    if math.isinf(value):
        return float(
            math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))
        )
    return float(value)


# ---------------------------------------------------------------------------
# Calibration: regression and split-conformal intervals


@dataclass
class PerImageMap:
    """Maps sorted reverse scores of one metric to a calibrated estimate.

    Attributes:
        aggregate: "max" (a line on the best score) or "topk" (ridge on all k).
        weights: coefficients on the features (1 for "max", k for "topk").
        intercept: the constant term.
        residuals: sorted absolute residuals on held-out calibration cases:
            the conformity scores of split-conformal prediction.
        n_fit: cases the regression was fitted on.
    """

    aggregate: str
    weights: list[float]
    intercept: float
    residuals: list[float]
    n_fit: int

    @staticmethod
    def features(scores: np.ndarray, aggregate: str) -> np.ndarray:
        """(n, k) sorted scores -> (n, d) regression features."""
        return scores[:, :1] if aggregate == "max" else scores

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Estimates (n,) from sorted scores (n, k), unclipped."""
        features = self.features(scores, self.aggregate)
        return features @ np.asarray(self.weights) + self.intercept

    def half_width(self, coverage: float) -> float:
        """Split-conformal half width: the ceil((n+1)c)/n residual quantile."""
        n = len(self.residuals)
        rank = math.ceil((n + 1) * coverage)
        if rank > n:
            return math.inf
        return float(self.residuals[rank - 1])

    def as_dict(self) -> dict[str, Any]:
        return {
            "aggregate": self.aggregate,
            "weights": self.weights,
            "intercept": self.intercept,
            "residuals": [round(r, 6) for r in self.residuals],
            "n_fit": self.n_fit,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerImageMap:
        return cls(
            aggregate=data["aggregate"],
            weights=[float(w) for w in data["weights"]],
            intercept=float(data["intercept"]),
            residuals=[float(r) for r in data["residuals"]],
            n_fit=int(data["n_fit"]),
        )


def fit_per_image_map(
    scores: np.ndarray,
    real: np.ndarray,
    groups: np.ndarray,
    *,
    aggregate: str = "topk",
    ridge: float = 1e-3,
    seed: int = 0,
) -> PerImageMap:
    """Fit on half of the calibration cases, conformity scores on the other.

    Args:
        scores: (n, k) sorted reverse scores of one metric.
        real: (n,) real values of that metric.
        groups: (n,) case identities; a case's points (one per checkpoint)
            stay on one side of the split, so held-out residuals are honest.
        aggregate: "max" or "topk".
        ridge: L2 penalty on the weights (features are in metric units).
    """
    if aggregate not in AGGREGATES:
        raise SPEError(
            f"aggregate {aggregate!r}: choose one of {', '.join(AGGREGATES)}"
        )
    unique = np.unique(groups)
    if len(unique) < 4:
        message = (
            f"per-image calibration needs at least 4 labeled calibration cases (half "
            f"fit, half set the intervals), got {len(unique)}; add cases or pass "
            f"--no-per-image"
        )
        raise SPEError(message)
    rng = np.random.default_rng([seed, 31337])
    held_out_groups = set(rng.permutation(unique)[: len(unique) // 2].tolist())
    held_out = np.array([g in held_out_groups for g in groups])

    features = PerImageMap.features(scores, aggregate)
    weights, intercept = _ridge(features[~held_out], real[~held_out], ridge)
    fitted = PerImageMap(
        aggregate, weights.tolist(), intercept, [], int((~held_out).sum())
    )
    residuals = np.abs(real[held_out] - fitted.predict(scores[held_out]))
    fitted.residuals = np.sort(residuals).tolist()
    return fitted


def _ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    """Ridge regression with an unpenalised intercept."""
    x_mean, y_mean = x.mean(axis=0), y.mean()
    centred = x - x_mean
    gram = centred.T @ centred + penalty * len(y) * np.eye(x.shape[1])
    weights = np.linalg.solve(gram, centred.T @ (y - y_mean))
    return weights, float(y_mean - x_mean @ weights)


@dataclass
class PerImageEstimate:
    """One case's estimate of one metric."""

    estimate: float
    low: float
    high: float
    best_reverse_score: float


def apply_per_image_map(
    fitted: PerImageMap, metric: str, scores: np.ndarray, *, coverage: float
) -> list[PerImageEstimate]:
    """Estimates with conformal intervals for (n, k) sorted scores."""
    centre = fitted.predict(scores)
    half = fitted.half_width(coverage)
    return [
        PerImageEstimate(
            estimate=clip_metric(metric, c),
            low=clip_metric(metric, c - half),
            high=clip_metric(metric, c + half),
            best_reverse_score=float(s[0]),
        )
        for c, s in zip(centre, scores, strict=True)
    ]


def flag_state(estimate: PerImageEstimate, threshold: float, metric: str) -> str:
    """ "below": the estimate fails the threshold; "uncertain": the interval
    reaches below it; "ok": the whole interval passes."""
    if HIGHER_IS_BETTER[metric]:
        if estimate.estimate < threshold:
            return "below"
        return "uncertain" if estimate.low < threshold else "ok"
    if estimate.estimate > threshold:
        return "below"
    return "uncertain" if estimate.high > threshold else "ok"


# ---------------------------------------------------------------------------
# Scoring per-image estimates where labels are known


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positives`` (ties count half).

    None when only one class is present.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties (Mann-Whitney U).
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


# ---------------------------------------------------------------------------
# The whole per-image step: settings, calibration, estimation


@dataclass
class PerImageSettings:
    """Settings of per-image estimation; recorded with the calibration.

    Attributes:
        k: reference images retrieved per target image.
        aggregate: "topk" (ridge on the k sorted scores) or "max".
        descriptor: settings of the retrieval descriptor.
        ridge: L2 penalty of the regression.
    """

    k: int = 8
    aggregate: str = "topk"
    descriptor: dict[str, Any] | None = None
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        if self.k < 1:
            raise SPEError(f"--k {self.k}: retrieve at least 1 reference image")
        if self.aggregate not in AGGREGATES:
            message = (
                f"--aggregate {self.aggregate!r}: choose {' or '.join(AGGREGATES)}"
            )
            raise SPEError(message)
        self.descriptor = dict(self.descriptor or IntensityDescriptor().settings())


def collect_scores(
    segmenter: InContextSegmenter,
    reference: PerImageReference,
    target: CaseSet,
    classes: Sequence[int],
    settings: PerImageSettings,
    *,
    threshold: float,
    hd95: str,
    progress: Callable | None = None,
) -> dict[str, np.ndarray]:
    """Class key -> sorted reverse scores (n_cases, k, n_metrics) of a target set."""
    descriptor = make_descriptor(settings.descriptor)
    return {
        str(label): reverse_scores(
            segmenter,
            reference,
            target,
            label,
            k=settings.k,
            threshold=threshold,
            hd95=hd95,
            descriptor=descriptor,
            progress=progress,
        )
        for label in classes
    }


def real_per_case(
    predictions: CaseSet, truth: CaseSet, classes: Sequence[int], *, hd95: str
) -> dict[str, np.ndarray]:
    """Class key -> real metrics (n_cases, n_metrics); inf counts as the diagonal."""
    real = {}
    for label in classes:
        rows = []
        for predicted, true in zip(predictions.cases, truth.cases, strict=True):
            values = binary_metrics(
                class_mask(predicted.mask, label),
                class_mask(true.mask, label),
                spacing=true.spacing,
                hd95=hd95,
            )
            shape = true.spatial_shape
            rows.append(
                [
                    _finite_distance(values[m], shape, true.spacing)
                    for m in PER_IMAGE_METRICS
                ]
            )
        real[str(label)] = np.asarray(rows)
    return real


def fit_per_image(
    scores: Sequence[dict[str, np.ndarray]],
    real: Sequence[dict[str, np.ndarray]],
    case_ids: Sequence[str],
    settings: PerImageSettings,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The per-image part of a calibration file, from several models' results.

    Args:
        scores, real: per model, class key -> (n_cases, k, M) and (n_cases, M).
        case_ids: the calibration cases, in the same order for every model.
    """
    groups = np.tile(np.arange(len(case_ids)), len(scores))
    maps: dict[str, dict[str, Any]] = {}
    for key in scores[0]:
        stacked_scores = np.concatenate([s[key] for s in scores])
        stacked_real = np.concatenate([r[key] for r in real])
        maps[key] = {
            metric: fit_per_image_map(
                stacked_scores[:, :, column],
                stacked_real[:, column],
                groups,
                aggregate=settings.aggregate,
                ridge=settings.ridge,
                seed=seed,
            ).as_dict()
            for column, metric in enumerate(PER_IMAGE_METRICS)
        }
    return {
        "settings": {
            "k": settings.k,
            "aggregate": settings.aggregate,
            "descriptor": settings.descriptor,
            "ridge": settings.ridge,
        },
        "metrics": list(PER_IMAGE_METRICS),
        "n_models": len(scores),
        "n_cases": len(case_ids),
        "maps": maps,
    }


def settings_from_record(record: dict[str, Any]) -> PerImageSettings:
    """The per-image settings a calibration file recorded."""
    try:
        return PerImageSettings(**record["settings"])
    except (KeyError, TypeError) as error:
        raise SPEError(f"the per-image calibration is malformed ({error})") from error


def estimate_cases(
    record: dict[str, Any],
    scores: dict[str, np.ndarray],
    case_ids: Sequence[str],
    *,
    coverage: float,
    flag_metric: str = "dice",
    flag_threshold: float = 0.7,
) -> list[dict[str, Any]]:
    """Rows of ``per_case.csv``: one per case and class, every metric.

    Each row has ``case_id``, ``class``, ``<metric>``, ``<metric>_low``,
    ``<metric>_high`` for every metric, and ``flag`` ("below", "uncertain"
    or "ok") for ``flag_metric`` against ``flag_threshold``.
    """
    if flag_metric not in PER_IMAGE_METRICS:
        choices = ", ".join(PER_IMAGE_METRICS)
        message = f"--flag-metric {flag_metric!r}: choose one of {choices}"
        raise SPEError(message)
    rows = []
    for key, class_scores in scores.items():
        per_metric = {}
        for column, metric in enumerate(PER_IMAGE_METRICS):
            fitted = PerImageMap.from_dict(record["maps"][key][metric])
            per_metric[metric] = apply_per_image_map(
                fitted, metric, class_scores[:, :, column], coverage=coverage
            )
        for index, case_id in enumerate(case_ids):
            row: dict[str, Any] = {"case_id": case_id, "class": key}
            for metric, estimates in per_metric.items():
                row[metric] = estimates[index].estimate
                row[f"{metric}_low"] = estimates[index].low
                row[f"{metric}_high"] = estimates[index].high
            row["flag"] = flag_state(
                per_metric[flag_metric][index], flag_threshold, flag_metric
            )
            rows.append(row)
    return rows


PER_CASE_COLUMNS = (
    "case_id",
    "class",
    *(name for m in PER_IMAGE_METRICS for name in (m, f"{m}_low", f"{m}_high")),
    "flag",
)


def evaluate_per_image(
    rows: Sequence[dict[str, Any]],
    real: dict[str, np.ndarray],
    *,
    failure_dice: float = 0.7,
) -> dict[str, dict[str, Any]]:
    """Pearson r, MAE, interval coverage and failure AUROC per metric.

    Args:
        rows: estimates from :func:`estimate_cases`, possibly over several
            models, in the same case order as ``real`` stacked likewise.
        real: class key -> real metrics (n, M) aligned with the rows of that
            class.
    """
    from spe.evaluation import interval_coverage, score_estimator

    results: dict[str, dict[str, Any]] = {}
    for column, metric in enumerate(PER_IMAGE_METRICS):
        estimates, lows, highs, truths, failures = [], [], [], [], []
        for key, values in real.items():
            class_rows = [row for row in rows if row["class"] == key]
            estimates += [row[metric] for row in class_rows]
            lows += [row[f"{metric}_low"] for row in class_rows]
            highs += [row[f"{metric}_high"] for row in class_rows]
            truths += values[:, column].tolist()
            failures += (
                values[:, PER_IMAGE_METRICS.index("dice")] < failure_dice
            ).tolist()
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        results[metric] = score_estimator(estimates, truths) | {
            "coverage": interval_coverage(lows, highs, truths),
            "auroc_failure": auroc([-sign * e for e in estimates], failures),
            "n_failures": int(np.sum(failures)),
        }
    return results


def mean_estimates(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Class key -> metric -> mean of the per-case estimates (and "mean").

    This is the statistic of the dataset estimate that holds under
    distribution shift: each image is judged by its own reverse
    segmentations, so an appearance change that a large support set would
    average away still shows.
    """
    keys = list(dict.fromkeys(row["class"] for row in rows))
    means = {
        key: {
            metric: float(np.mean([row[metric] for row in rows if row["class"] == key]))
            for metric in PER_IMAGE_METRICS
        }
        for key in keys
    }
    if len(keys) > 1:
        means["mean"] = {
            metric: float(np.mean([means[key][metric] for key in keys]))
            for metric in PER_IMAGE_METRICS
        }
    return means
