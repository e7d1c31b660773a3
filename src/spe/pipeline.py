"""The method end to end: pseudo metrics, real metrics, calibrate, estimate.

A result for one set of predictions is a map from class key to metric to
value. Class keys are "1" for a binary task, else the labels as strings,
plus "mean" (the mean over classes) when there are several classes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from spe.calibration import Calibration, apply_map, fit_maps, widen_by_disagreement
from spe.cases import CaseSet, resolve_task, with_binary_masks
from spe.errors import SPEError
from spe.intensity import INTENSITY_MODES
from spe.metrics import labels_seen, summarize_class
from spe.per_image import (
    PerImageSettings,
    collect_scores,
    estimate_cases,
    fit_per_image,
    make_descriptor,
    mean_estimates,
    prepare_per_image_reference,
    real_per_case,
    settings_from_record,
)
from spe.reverse import ReferenceSet, prepare_reference, pseudo_metrics
from spe.scoring import score_case
from spe.segmenters import InContextSegmenter
from spe.support import select_support, slice_axis_for

logger = logging.getLogger(__name__)

# The six metrics of the published protocol.
PIPELINE_METRICS = ("dice", "jaccard", "precision", "recall", "pearson", "hd95")

ClassScores = dict[str, dict[str, float]]


@dataclass
class Settings:
    """Settings of the reverse step; a calibration is valid only for its own.

    Attributes:
        min_area: least predicted foreground pixels of a support candidate.
        max_support: most support pairs per class.
        repetitions: random support draws averaged per result.
        threshold: binarisation threshold of reverse probabilities.
        max_references: most reference cases segmented (None: all).
        seed: seeds every random draw.
        hd95: HD95 variant, "max" or "union".
        slice_axis: slice axis for volumes (None: the largest spacing).
        intensity: intensity standardisation of support and reference images
            before in-context segmentation (see :mod:`spe.intensity`).
    """

    min_area: int = 10
    max_support: int = 64
    repetitions: int = 1
    threshold: float = 0.5
    max_references: int | None = None
    seed: int = 0
    hd95: str = "max"
    slice_axis: int | None = None
    # Local standardisation won on both the in-distribution protocol and the
    # shift benchmark (docs/benchmarks.md); "minmax" is the published choice.
    intensity: str = "local"

    def validate(self) -> Settings:
        if self.min_area < 0:
            raise SPEError(f"--min-area {self.min_area}: must be 0 or more pixels")
        if self.max_support < 1:
            raise SPEError(f"--max-support {self.max_support}: must be at least 1")
        if self.repetitions < 1:
            raise SPEError(f"--repetitions {self.repetitions}: must be at least 1")
        if not 0 < self.threshold < 1:
            raise SPEError(f"--threshold {self.threshold}: must be between 0 and 1")
        if self.max_references is not None and self.max_references < 1:
            raise SPEError(
                f"--max-references {self.max_references}: must be at least 1"
            )
        if self.intensity not in INTENSITY_MODES:
            choices = ", ".join(INTENSITY_MODES)
            raise SPEError(f"--intensity {self.intensity!r}: choose one of {choices}")
        if self.slice_axis is not None and self.slice_axis not in (0, 1, 2):
            raise SPEError(f"--slice-axis {self.slice_axis}: must be 0, 1 or 2")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def axis_for(self, cases: CaseSet) -> int:
        """The slice axis to use for a set of cases."""
        if self.slice_axis is not None:
            return self.slice_axis
        return slice_axis_for(cases.cases[0].spacing) if cases.is_volume else 0


def class_keys(classes: Sequence[int]) -> list[str]:
    """["1"] for a binary task; ["1", "2", "mean"] for several classes."""
    keys = [str(label) for label in classes]
    return [*keys, "mean"] if len(keys) > 1 else keys


def add_class_mean(scores: ClassScores, classes: Sequence[int]) -> ClassScores:
    """Add the "mean" key (mean over classes) when there are several classes."""
    if len(classes) > 1:
        labels = [str(label) for label in classes]
        metrics = scores[labels[0]]
        scores["mean"] = {
            m: float(np.mean([scores[k][m] for k in labels])) for m in metrics
        }
    return scores


@dataclass
class PseudoResult:
    """Pseudo metrics of one set of predictions, with how the support looked."""

    scores: ClassScores
    support: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def empty_support_classes(self) -> list[str]:
        return [key for key, info in self.support.items() if info["n_support"] == 0]


def compute_pseudo(
    segmenter: InContextSegmenter,
    reference: ReferenceSet,
    target: CaseSet,
    classes: Sequence[int],
    settings: Settings,
) -> PseudoResult:
    """Pseudo metrics of a target set whose masks are the model's predictions.

    One support set per class (and per repetition, averaged).
    """
    axis = settings.axis_for(target)
    scores: ClassScores = {}
    support_info: dict[str, dict[str, Any]] = {}
    for label in classes:
        repetitions = []
        for repetition in range(settings.repetitions):
            support = select_support(
                target,
                label,
                min_area=settings.min_area,
                max_support=settings.max_support,
                seed=settings.seed,
                repetition=repetition,
                axis=axis,
            )
            result = pseudo_metrics(
                segmenter,
                reference,
                support,
                label,
                threshold=settings.threshold,
                hd95=settings.hd95,
            )
            repetitions.append(result.mean)
        scores[str(label)] = {
            metric: float(np.mean([r[metric] for r in repetitions]))
            for metric in PIPELINE_METRICS
        }
        support_info[str(label)] = {
            "n_support": len(support),
            "n_candidates": support.n_candidates,
        }
        if support.is_empty:
            logger.warning(
                "%s: no prediction of class %s has %d or more pixels; scoring an "
                "empty segmentation",
                target.source,
                label,
                settings.min_area,
            )
    return PseudoResult(scores=add_class_mean(scores, classes), support=support_info)


def compute_real(
    predictions: CaseSet, truth: CaseSet, classes: Sequence[int], *, hd95: str = "max"
) -> ClassScores:
    """Real metrics of predictions against ground truth, averaged over cases.

    Both sets hold the same cases in the same order; masks are the prediction
    and the ground truth respectively.
    """
    scored = [
        score_case(p.case_id, p.mask, t.mask, classes, spacing=t.spacing, hd95=hd95)
        for p, t in zip(predictions.cases, truth.cases, strict=True)
    ]
    scores: ClassScores = {}
    for label in classes:
        summary = summarize_class(
            [case.scores[label] for case in scored],
            [case.diagonal_mm for case in scored],
        )
        scores[str(label)] = {m: summary.mean[m] for m in PIPELINE_METRICS}
    return add_class_mean(scores, classes)


def ground_truth_labels(*truth_sets: CaseSet) -> list[int]:
    """Every label the ground truth of these sets uses (predictions may too)."""
    return sorted(
        labels_seen(case.mask for cases in truth_sets for case in cases.cases)
    )


def check_same_kind(reference: CaseSet, other: CaseSet) -> None:
    """Raise SPEError when one set holds 2-D images and the other volumes."""
    if reference.is_volume != other.is_volume:
        kinds = {True: "3-D volumes", False: "2-D images"}
        message = (
            f"{reference.source} holds {kinds[reference.is_volume]} but "
            f"{other.source} holds {kinds[other.is_volume]}; use one kind throughout"
        )
        raise SPEError(message)


def prepare_references(
    segmenter: InContextSegmenter,
    reference: CaseSet,
    settings: Settings,
    *,
    axis: int | None = None,
) -> ReferenceSet:
    """The reference queries for ``segmenter`` under the pipeline settings."""
    return prepare_reference(
        segmenter,
        reference,
        max_references=settings.max_references,
        seed=settings.seed,
        axis=settings.axis_for(reference) if axis is None else axis,
        intensity=settings.intensity,
    )


def reference_record(reference: CaseSet) -> dict[str, Any]:
    """What a calibration records of its reference set."""
    return {
        "fingerprint": reference.fingerprint,
        "n_cases": len(reference),
        "source": reference.source,
        "labels_name": reference.labels_name,
    }


def segmenter_record(segmenter: InContextSegmenter) -> dict[str, Any]:
    return {"name": segmenter.name, "settings": segmenter.settings()}


# ---------------------------------------------------------------------------
# Calibrate and estimate


def calibrate(
    segmenter: InContextSegmenter,
    reference: CaseSet,
    calibration_set: CaseSet,
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    *,
    settings: Settings,
    classes: Sequence[int] | None = None,
    per_image: PerImageSettings | None = None,
    progress: Any = None,
) -> Calibration:
    """Fit G on a labeled calibration set predicted by several models.

    Args:
        reference: labeled reference cases.
        calibration_set: labeled cases (masks are the ground truth).
        predictions: checkpoint or model name -> case id -> predicted mask.
        per_image: also calibrate per-image estimates (2-D only).
        progress: optional callable wrapping an iterable (a progress bar).
    """
    if per_image is not None and reference.is_volume:
        logger.warning("per-image estimates need 2-D images; calibrating datasets only")
        per_image = None
    settings.validate()
    check_same_kind(reference, calibration_set)
    classes, binary = resolve_task([reference, calibration_set], classes)
    allowed = ground_truth_labels(reference, calibration_set)
    prepared = prepare_references(segmenter, reference, settings)

    per_image_reference = None
    if per_image is not None:
        per_image_reference = prepare_per_image_reference(
            segmenter,
            reference,
            make_descriptor(per_image.descriptor),
            intensity=settings.intensity,
        )

    names = list(predictions)
    pseudo, real, image_scores, image_real = [], [], [], []
    iterator = progress(names) if progress else names
    for name in iterator:
        predicted = with_binary_masks(
            calibration_set.with_masks(dict(predictions[name]), source=name),
            binary,
            allowed=allowed,
        )
        pseudo.append(
            compute_pseudo(segmenter, prepared, predicted, classes, settings).scores
        )
        real.append(
            compute_real(predicted, calibration_set, classes, hd95=settings.hd95)
        )
        if per_image_reference is not None:
            image_scores.append(
                collect_scores(
                    segmenter,
                    per_image_reference,
                    predicted,
                    classes,
                    per_image,
                    threshold=settings.threshold,
                    hd95=settings.hd95,
                )
            )
            image_real.append(
                real_per_case(predicted, calibration_set, classes, hd95=settings.hd95)
            )

    calibration = Calibration.fit(
        pseudo,
        real,
        names,
        metrics=PIPELINE_METRICS,
        segmenter=segmenter_record(segmenter),
        settings=settings.as_dict() | {"classes": list(classes)},
        reference=reference_record(reference),
    )
    if per_image is not None:
        calibration.per_image = fit_per_image(
            image_scores,
            image_real,
            calibration_set.case_ids,
            per_image,
            seed=settings.seed,
        )
        # The dataset estimate from per-image ones: a line per class and metric
        # from the mean per-image estimate of each model to its real mean.
        means = [
            mean_estimates(
                estimate_cases(
                    calibration.per_image,
                    scores,
                    calibration_set.case_ids,
                    coverage=0.9,
                )
            )
            for scores in image_scores
        ]
        calibration.from_images, _ = fit_maps(means, real, names, PIPELINE_METRICS)
    return calibration


def settings_from_calibration(calibration: Calibration) -> tuple[Settings, list[int]]:
    """The pipeline settings and classes a calibration was made with.

    Raises:
        SPEError: the recorded settings are missing or of the wrong type (a
            hand-edited file), or their classes do not match the maps.
    """
    stored = dict(calibration.settings)
    types = {
        "min_area": int,
        "max_support": int,
        "repetitions": int,
        "threshold": (int, float),
        "max_references": (int, type(None)),
        "seed": int,
        "hd95": str,
        "slice_axis": (int, type(None)),
        "intensity": str,
    }
    problem = None
    classes = stored.pop("classes", None)
    if not isinstance(classes, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in classes
    ):
        problem = "classes"
    else:
        expected = [str(c) for c in classes] + (["mean"] if len(classes) > 1 else [])
        if expected != calibration.classes:
            problem = "classes"
    for name, kind in types.items():
        value = stored.get(name, getattr(Settings(), name))
        if isinstance(value, bool) or not isinstance(value, kind):
            problem = problem or name
    if problem is None:
        try:
            settings = Settings(**{k: stored[k] for k in types if k in stored})
            return settings.validate(), list(classes)
        except SPEError:
            problem = "a value"
    message = (
        f"the calibration's settings are malformed ({problem}); it was edited or "
        f"damaged, so recalibrate"
    )
    raise SPEError(message)


@dataclass
class DatasetEstimate:
    """Estimates for one set of predictions.

    Attributes:
        estimates: class key -> metric -> Estimate as a dict: from the mean
            per-image estimate when available (``method`` "per-image mean"),
            else from the pseudo metrics (``method`` "pseudo").
        pseudo: the pseudo metrics.
        published: the estimates from the pseudo metrics, as published.
        warnings: extrapolation and empty-support warnings.
        per_case: per-image rows (see :func:`spe.per_image.estimate_cases`),
            empty when the calibration has no per-image part or for volumes.
    """

    estimates: dict[str, dict[str, Any]]
    pseudo: PseudoResult
    warnings: list[str]
    published: dict[str, dict[str, Any]] = field(default_factory=dict)
    method: str = "pseudo"
    per_case: list[dict[str, Any]] = field(default_factory=list)
    per_case_note: str = ""


def estimate(
    segmenter: InContextSegmenter,
    calibration: Calibration,
    reference: CaseSet,
    target: CaseSet,
    *,
    coverage: float = 0.9,
    flag_metric: str = "dice",
    flag_threshold: float = 0.7,
    progress: Any = None,
) -> DatasetEstimate:
    """Estimate the metrics of a model's predictions (``target`` masks).

    Raises:
        SPEError: the segmenter or the reference set differs from the
            calibration's.
    """
    if not 0 < coverage < 1:
        raise SPEError(f"--coverage {coverage}: must be between 0 and 1 (e.g. 0.9)")
    settings, classes = settings_from_calibration(calibration)
    calibration.check_compatible(
        segmenter=segmenter_record(segmenter),
        reference_fingerprint=reference.fingerprint,
        reference_source=reference.source,
        reference_labels_name=reference.labels_name,
    )
    check_same_kind(reference, target)
    _, binary = resolve_task([reference], classes)
    target = with_binary_masks(target, binary, allowed=ground_truth_labels(reference))
    prepared = prepare_references(segmenter, reference, settings)

    pseudo = compute_pseudo(segmenter, prepared, target, classes, settings)
    published, warnings = apply_maps(
        calibration.dataset_level,
        pseudo.scores,
        coverage=coverage,
        statistic_name="pseudo",
    )
    for key in pseudo.empty_support_classes:
        warnings.append(
            f"class {key}: the model predicted no region of {settings.min_area} or "
            f"more pixels; the estimate is that of an empty segmentation"
        )
    result = DatasetEstimate(
        estimates=published,
        pseudo=pseudo,
        warnings=warnings,
        published=published,
        method="pseudo",
    )

    if calibration.per_image is None:
        result.per_case_note = (
            "no per-image estimates: the calibration was made without them "
            "(--no-per-image)"
        )
    elif target.is_volume:
        result.per_case_note = (
            "no per-image estimates: they are made for 2-D images, and these are "
            "volumes"
        )
    else:
        per_image = settings_from_record(calibration.per_image)
        per_image_reference = prepare_per_image_reference(
            segmenter,
            reference,
            make_descriptor(per_image.descriptor),
            intensity=settings.intensity,
        )
        scores = collect_scores(
            segmenter,
            per_image_reference,
            target,
            classes,
            per_image,
            threshold=settings.threshold,
            hd95=settings.hd95,
            progress=progress,
        )
        result.per_case = estimate_cases(
            calibration.per_image,
            scores,
            target.case_ids,
            coverage=coverage,
            flag_metric=flag_metric,
            flag_threshold=flag_threshold,
        )

    # The per-image mean is the dataset estimate whenever it is available.
    if calibration.from_images is not None and result.per_case:
        from_images, image_warnings = apply_maps(
            calibration.from_images,
            mean_estimates(result.per_case),
            coverage=coverage,
            statistic_name="mean per-image estimate",
        )
        result.estimates = {
            key: {
                metric: widen_by_disagreement(values, published[key][metric], metric)
                for metric, values in per_metric.items()
            }
            for key, per_metric in from_images.items()
        }
        result.method = "per-image mean"
        result.warnings = image_warnings + [
            w for w in result.warnings if "empty segmentation" in w
        ]
    for message in result.warnings:
        logger.warning(message)
    return result


def apply_maps(
    maps: dict[str, dict[str, Any]],
    statistic: dict[str, dict[str, float]],
    *,
    coverage: float,
    statistic_name: str = "pseudo",
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """G applied to a statistic per class and metric, with range warnings.

    Returns:
        (class -> metric -> Estimate as a dict, warnings).
    """
    label = statistic_name
    estimates: dict[str, dict[str, Any]] = {}
    warnings = []
    for key, per_metric in maps.items():
        estimates[key] = {}
        for metric, linear in per_metric.items():
            value = statistic[key][metric]
            result = apply_map(linear, metric, value, coverage=coverage)
            estimates[key][metric] = result.as_dict()
            if not result.in_calibrated_range:
                warnings.append(
                    f"class {key} {metric}: {label} value {value:.4g} is outside the "
                    f"calibrated range [{linear.pseudo_min:.4g}, "
                    f"{linear.pseudo_max:.4g}]; the estimate extrapolates"
                )
    return estimates, warnings
