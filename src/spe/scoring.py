"""Scoring predictions against ground truth over many cases and classes.

This is what ``spe metrics`` runs, and how the pipeline computes real
metrics: per-case rows (one per case and class) and a summary with means per
class, the mean over classes, and the cases that needed a convention.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from spe import io
from spe.errors import SPEError
from spe.metrics import (
    METRIC_NAMES,
    binarize,
    binary_metrics,
    class_mask,
    diagonal_mm,
    is_binary_task,
    labels_seen,
    mean_over_classes,
    summarize_class,
    task_classes,
)

logger = logging.getLogger(__name__)

PER_CASE_COLUMNS = (
    "case_id",
    "class",
    *METRIC_NAMES,
    "prediction_empty",
    "truth_empty",
)


@dataclass
class ScoredCase:
    """One case's metrics per class, with what the summary needs to know."""

    case_id: str
    scores: dict[int, dict[str, float]]
    empty: dict[int, tuple[bool, bool]]  # class -> (prediction, truth) empty
    diagonal_mm: float


def score_case(
    case_id: str,
    prediction: np.ndarray,
    truth: np.ndarray,
    classes: Sequence[int],
    *,
    spacing: Sequence[float],
    hd95: str = "max",
) -> ScoredCase:
    """Metrics of one case for each class; see :mod:`spe.metrics`."""
    scores, empty = {}, {}
    for label in classes:
        predicted = class_mask(prediction, label)
        true = class_mask(truth, label)
        scores[label] = binary_metrics(predicted, true, spacing=spacing, hd95=hd95)
        empty[label] = (not predicted.any(), not true.any())
    return ScoredCase(
        case_id=case_id,
        scores=scores,
        empty=empty,
        diagonal_mm=diagonal_mm(truth.shape, spacing),
    )


def per_case_rows(cases: Sequence[ScoredCase]) -> list[dict[str, Any]]:
    """One row per case and class, for ``per_case.csv``."""
    rows = []
    for case in cases:
        for label, scores in case.scores.items():
            prediction_empty, truth_empty = case.empty[label]
            rows.append(
                {"case_id": case.case_id, "class": label}
                | scores
                | {"prediction_empty": prediction_empty, "truth_empty": truth_empty}
            )
    return rows


def summarize(
    cases: Sequence[ScoredCase], classes: Sequence[int], *, hd95: str = "max"
) -> dict[str, Any]:
    """The summary of ``spe metrics``: means per class and over classes.

    Returns:
        A JSON-ready map with ``n_cases``, ``classes``, ``hd95_variant``,
        ``mean`` (class label as a string -> metric -> mean), and
        ``mean_over_classes``, ``n_infinite_distance``,
        ``infinite_distance_cases`` and ``empty`` per class.
    """
    if not cases:
        raise SPEError("no cases to score; check the prediction and label folders")
    per_class = {
        str(label): summarize_class(
            [case.scores[label] for case in cases],
            [case.diagonal_mm for case in cases],
            case_ids=[case.case_id for case in cases],
            empties=[case.empty[label] for case in cases],
        )
        for label in classes
    }
    return {
        "n_cases": len(cases),
        "classes": [str(label) for label in classes],
        "hd95_variant": hd95,
        "mean": {label: summary.mean for label, summary in per_class.items()},
        "mean_over_classes": mean_over_classes(per_class),
        "n_infinite_distance": {
            label: summary.n_infinite for label, summary in per_class.items()
        },
        "infinite_distance_cases": {
            label: summary.infinite_cases for label, summary in per_class.items()
        },
        "empty": {
            label: {
                "prediction_only": summary.n_empty_prediction,
                "truth_only": summary.n_empty_truth,
                "both": summary.n_both_empty,
            }
            for label, summary in per_class.items()
        },
        "infinite_distance_convention": (
            "an infinite HD95 or ASSD counts as the image diagonal (mm, or pixels "
            "without spacing) in means"
        ),
    }


def parse_classes(text: str | None) -> list[int] | None:
    """'1,2' -> [1, 2]; None stays None (classes found from the labels)."""
    if text is None:
        return None
    try:
        classes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as error:
        message = f"--classes {text!r}: give positive class labels such as 1,2"
        raise SPEError(message) from error
    if not classes or classes[0] <= 0:
        raise SPEError(f"--classes {text!r}: class labels must be positive integers")
    return classes


def score_folders(
    predictions: Path | str,
    labels: Path | str,
    *,
    classes: Sequence[int] | None = None,
    hd95: str = "max",
    spacing: Sequence[float] | None = None,
    spacing_table: dict[str, tuple[float, ...]] | None = None,
    progress: bool = True,
) -> tuple[list[ScoredCase], list[int]]:
    """Score every prediction file against the label file of the same case.

    Args:
        predictions, labels: folders of masks matched by case id.
        classes: labels to score; None finds them from the ground truth.
        spacing: overrides every file's spacing (mm, array axis order).
        spacing_table: per-case spacing (see :func:`spe.io.read_spacing_table`).

    Returns:
        (scored cases, the classes scored).
    """
    listed_labels = io.list_cases(labels)
    prediction_files = io.list_mask_cases(predictions, matching=listed_labels)
    label_files = io.read_mask_suffix(listed_labels, prediction_files)
    case_ids = io.match_cases(
        prediction_files,
        label_files,
        first_name=str(predictions),
        second_name=str(labels),
    )

    pairs = []
    for case_id in tqdm(case_ids, desc="reading", disable=not progress, leave=False):
        case_spacing = spacing
        if spacing_table is not None:
            if case_id not in spacing_table:
                message = f"case {case_id!r} has no row in the spacing table; add one"
                raise SPEError(message)
            case_spacing = spacing_table[case_id]
        truth = io.read_mask(label_files[case_id])
        if case_spacing is not None:
            case_spacing = io.expand_spacing(tuple(case_spacing), truth.array.ndim)
            truth = dataclasses.replace(truth, spacing=case_spacing)
        prediction = io.read_mask(prediction_files[case_id], spacing=truth.spacing)
        io.check_same_shape(prediction, truth)
        pairs.append((case_id, prediction, truth))

    classes, binary = task_classes(
        [truth.array for _, _, truth in pairs], classes, source=str(labels)
    )
    logger.info("scoring classes %s", classes)
    if binary:
        for _, prediction, _ in pairs:
            labels = labels_seen([prediction.array])
            if not is_binary_task(labels):
                message = (
                    f"{prediction.path}: holds labels {sorted(labels)} but the ground "
                    f"truth is binary; pass predictions of the same task"
                )
                raise SPEError(message)
        pairs = [
            (
                case_id,
                _with_array(prediction, binarize(prediction.array)),
                _with_array(truth, binarize(truth.array)),
            )
            for case_id, prediction, truth in pairs
        ]

    scored = [
        score_case(
            case_id,
            prediction.array,
            truth.array,
            classes,
            spacing=truth.spacing,
            hd95=hd95,
        )
        for case_id, prediction, truth in tqdm(
            pairs, desc="scoring", disable=not progress, leave=False
        )
    ]
    return scored, list(classes)


def _with_array(image: io.LoadedImage, array: np.ndarray) -> io.LoadedImage:
    return dataclasses.replace(image, array=array)
