"""Segmentation metrics per case and per class, with the empty-mask conventions.

Conventions (``docs`` of the project, pinned by tests):

- a binary mask is ``value > 0``; a label map is scored class by class
  (label k against label k) and background is not scored;
- both masks empty: a perfect match (overlaps 1, distances 0); exactly one
  empty: overlaps 0 and distances infinite; a mask constant over the whole
  image makes pixel Pearson 0 unless both masks are identical;
- boundary pixels are foreground pixels with a face-connected background
  neighbour (outside the array counts as background); distances between
  boundaries are Euclidean in physical units (the spacing, mm);
- HD95 is the larger of the two directed 95th percentiles (``"max"``, as
  MONAI and DeepMind surface-distance); ``"union"`` pools both directed sets
  first (medpy and the published SPE code). Percentiles interpolate linearly.

When cases are averaged, an infinite distance counts as the image diagonal in
physical units, and the summary counts how many cases that affected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from spe.errors import SPEError

OVERLAP_METRICS = ("dice", "jaccard", "precision", "recall", "pearson")
DISTANCE_METRICS = ("hd95", "assd")
METRIC_NAMES = OVERLAP_METRICS + DISTANCE_METRICS
HD95_VARIANTS = ("max", "union")

# Metrics where a larger value is better; the distances are the others.
HIGHER_IS_BETTER = dict.fromkeys(OVERLAP_METRICS, True) | dict.fromkeys(
    DISTANCE_METRICS, False
)

# ---------------------------------------------------------------------------
# Surface distances


def boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a face-connected background neighbour (bool).

    Outside the array counts as background. Same result as the mask minus its
    erosion by the cross-shaped structuring element, without scipy's overhead
    on the small crops this is called on.
    """
    padded = np.pad(mask, 1)
    interior = mask.copy()
    inner = [slice(1, -1)] * mask.ndim
    for axis in range(mask.ndim):
        for shifted in (slice(0, -2), slice(2, None)):
            window = list(inner)
            window[axis] = shifted
            interior &= padded[tuple(window)]
    return mask & ~interior


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every foreground pixel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        occupied = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(box)


# Up to this many boundary pixel pairs, comparing every pair is faster than
# two distance transforms (and needs at most ~8 MB).
MAX_PAIRS_COMPARED = 1_000_000


def directed_distances(
    prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Boundary-to-boundary distances in both directions, in physical units.

    Args:
        prediction, truth: non-empty boolean masks of the same shape.
        spacing: pixel size along each axis (mm).

    Returns:
        (from each prediction boundary pixel to the nearest truth boundary
        pixel, from each truth boundary pixel to the nearest prediction
        boundary pixel), as float64 arrays.
    """
    # Everything outside the box holding both masks is background for both, so
    # cropping to it changes no boundary and no nearest-boundary distance.
    box = _bounding_box(prediction | truth)
    prediction_border = boundary(prediction[box])
    truth_border = boundary(truth[box])

    # Small boundaries (every 2-D case): exact distances between all pairs.
    n_prediction = int(np.count_nonzero(prediction_border))
    n_truth = int(np.count_nonzero(truth_border))
    if n_prediction * n_truth <= MAX_PAIRS_COMPARED:
        squared = np.zeros((n_prediction, n_truth))
        for axis, (p, t) in enumerate(
            zip(np.nonzero(prediction_border), np.nonzero(truth_border), strict=True)
        ):
            squared += np.square(
                (p[:, None] - t[None, :]).astype(np.float64) * spacing[axis]
            )
        return np.sqrt(squared.min(axis=1)), np.sqrt(squared.min(axis=0))

    # Large boundaries (3-D): distance transforms of each boundary.
    to_truth = ndimage.distance_transform_edt(~truth_border, sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~prediction_border, sampling=spacing)
    return to_truth[prediction_border], to_prediction[truth_border]


def _percentile(values: np.ndarray, q: float) -> float:
    """np.percentile with linear interpolation, without its overhead."""
    ordered = np.sort(values)
    rank = (ordered.size - 1) * q / 100
    low = int(rank)
    high = min(low + 1, ordered.size - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def hd95_from_distances(
    forward: np.ndarray, backward: np.ndarray, *, variant: str = "max"
) -> float:
    """HD95 from the two directed distance sets (see the module docstring)."""
    if variant == "max":
        return max(_percentile(forward, 95), _percentile(backward, 95))
    if variant == "union":
        return _percentile(np.concatenate([forward, backward]), 95)
    raise ValueError(f"unknown HD95 variant {variant!r}; use one of {HD95_VARIANTS}")


# ---------------------------------------------------------------------------
# One binary case


def binary_metrics(
    prediction: np.ndarray,
    truth: np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    hd95: str = "max",
    distances: bool = True,
) -> dict[str, float]:
    """All metrics of one binary case.

    Args:
        prediction, truth: arrays of one shape, 2-D or 3-D; value > 0 is
            foreground.
        spacing: pixel or voxel size per axis in mm (default 1.0 each).
        hd95: ``"max"`` (default) or ``"union"``, see the module docstring.
        distances: compute HD95 and ASSD (skip them for speed when only
            overlaps are needed; they are then NaN).

    Returns:
        ``dice``, ``jaccard``, ``precision``, ``recall``, ``pearson`` in
        [0, 1] ([-1, 1] for pearson), ``hd95`` and ``assd`` in mm (inf when
        exactly one mask is empty).
    """
    if prediction.shape != truth.shape:
        message = f"prediction shape {prediction.shape} != truth shape {truth.shape}"
        raise ValueError(message)
    if hd95 not in HD95_VARIANTS:
        raise ValueError(f"unknown HD95 variant {hd95!r}; use one of {HD95_VARIANTS}")
    spacing = tuple(float(s) for s in spacing) if spacing else (1.0,) * truth.ndim
    prediction = prediction > 0
    truth = truth > 0

    # Counts as Python ints: products of voxel counts overflow int64 in 3-D.
    n_pixels = truth.size
    n_prediction = int(np.count_nonzero(prediction))
    n_truth = int(np.count_nonzero(truth))
    tp = int(np.count_nonzero(prediction & truth))
    fp = n_prediction - tp
    fn = n_truth - tp
    tn = n_pixels - tp - fp - fn

    nan = float("nan")
    if n_prediction == 0 and n_truth == 0:
        scores = dict.fromkeys(OVERLAP_METRICS, 1.0) | {"hd95": 0.0, "assd": 0.0}
        return scores if distances else scores | {"hd95": nan, "assd": nan}
    if n_prediction == 0 or n_truth == 0:
        scores = dict.fromkeys(OVERLAP_METRICS, 0.0)
        inf = math.inf if distances else nan
        return scores | {"hd95": inf, "assd": inf}

    scores = {
        "dice": 2 * tp / (2 * tp + fp + fn),
        "jaccard": tp / (tp + fp + fn),
        "precision": tp / n_prediction,
        "recall": tp / n_truth,
        "pearson": _pearson(tp, fp, fn, tn),
    }
    if not distances:
        return scores | {"hd95": nan, "assd": nan}

    forward, backward = directed_distances(prediction, truth, spacing)
    scores["hd95"] = hd95_from_distances(forward, backward, variant=hd95)
    scores["assd"] = float(
        (forward.sum() + backward.sum()) / (forward.size + backward.size)
    )
    return scores


def _pearson(tp: int, fp: int, fn: int, tn: int) -> float:
    """Pearson correlation of two binary masks (the Matthews coefficient)."""
    denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    if denominator == 0:
        # A mask constant over the whole image has no variance: 0 by
        # convention, unless the other mask is the same constant.
        return 1.0 if fp == 0 and fn == 0 else 0.0
    return (tp * tn - fp * fn) / math.sqrt(denominator)


# ---------------------------------------------------------------------------
# Label maps


# More distinct labels than this in ground truth means intensity images were
# given where masks were expected.
MAX_CLASSES = 32


def labels_seen(label_maps: Iterable[np.ndarray]) -> set[int]:
    """Every nonzero value in a set of label maps."""
    seen: set[int] = set()
    for label_map in label_maps:
        seen.update(int(v) for v in np.unique(label_map) if v != 0)
    return seen


def is_binary_task(seen: set[int]) -> bool:
    """Whether masks with these nonzero values are binary (0/1, 0/255, mixed)."""
    return len(seen) <= 1 or seen <= {1, 255}


def find_classes(label_maps: Iterable[np.ndarray]) -> list[int]:
    """The class labels of a task: [1] for binary masks, else the labels seen.

    Masks whose nonzero values are one number, or 1 and 255 (0/1 and 0/255
    files mixed), are a binary task: class 1, foreground ``value > 0``.
    """
    seen = labels_seen(label_maps)
    return [1] if is_binary_task(seen) else sorted(seen)


def task_classes(
    label_maps: Sequence[np.ndarray],
    classes: Sequence[int] | None = None,
    *,
    source: str = "the labels",
) -> tuple[list[int], bool]:
    """(classes, binary) of a task from its ground-truth label maps.

    Args:
        label_maps: every ground-truth mask of the task.
        classes: the classes asked for, or None for every class found.
        source: names the labels in error messages.

    Raises:
        SPEError: a class asked for is not in the labels, or the labels hold
            so many values that they look like intensity images.
    """
    seen = labels_seen(label_maps)
    binary = is_binary_task(seen)
    if not binary and len(seen) > MAX_CLASSES:
        message = (
            f"{source}: the labels hold {len(seen)} different values, which looks "
            f"like intensity images rather than masks; check the labels folder"
        )
        raise SPEError(message)
    found = [1] if binary else sorted(seen)
    if classes is None:
        return found, binary
    missing = [label for label in classes if label not in found]
    if missing:
        kind = "binary masks (class 1)" if binary else f"classes {found}"
        message = (
            f"class {', '.join(map(str, missing))} is not in {source}, which hold "
            f"{kind}; fix --classes"
        )
        raise SPEError(message)
    return list(classes), binary


def binarize(label_map: np.ndarray) -> np.ndarray:
    """A binary task's mask as 0/1 uint8: every nonzero value is foreground."""
    return (label_map > 0).astype(np.uint8)


def class_mask(label_map: np.ndarray, label: int) -> np.ndarray:
    """Boolean mask of one class (binary tasks are stored 0/1, see binarize)."""
    return label_map == label


def label_metrics(
    prediction: np.ndarray,
    truth: np.ndarray,
    classes: Sequence[int],
    *,
    spacing: Sequence[float] | None = None,
    hd95: str = "max",
    distances: bool = True,
) -> dict[int, dict[str, float]]:
    """Metrics per class of one case (label k against label k)."""
    return {
        label: binary_metrics(
            class_mask(prediction, label),
            class_mask(truth, label),
            spacing=spacing,
            hd95=hd95,
            distances=distances,
        )
        for label in classes
    }


def diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image diagonal in physical units: the worst distance."""
    return float(
        math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))
    )


# ---------------------------------------------------------------------------
# Averaging cases


@dataclass
class ClassSummary:
    """Means over cases of one class, and the cases that needed a convention."""

    mean: dict[str, float]
    n_cases: int
    n_infinite: int = 0
    n_empty_truth: int = 0
    n_empty_prediction: int = 0
    n_both_empty: int = 0
    infinite_cases: list[str] = field(default_factory=list)


def summarize_class(
    scores: Sequence[Mapping[str, float]],
    diagonals: Sequence[float],
    *,
    case_ids: Sequence[str] | None = None,
    empties: Sequence[tuple[bool, bool]] | None = None,
) -> ClassSummary:
    """Mean of each metric over cases; an infinite distance counts as the diagonal.

    Args:
        scores: per case, a map from metric name to value.
        diagonals: per case, the image diagonal in mm.
        case_ids: names for the cases with an infinite distance.
        empties: per case, (prediction empty, truth empty).
    """
    case_ids = (
        list(case_ids) if case_ids is not None else [str(i) for i in range(len(scores))]
    )
    mean: dict[str, float] = {}
    infinite = np.zeros(len(scores), dtype=bool)
    for name in scores[0] if scores else METRIC_NAMES:
        values = np.array([case[name] for case in scores], dtype=np.float64)
        if name in DISTANCE_METRICS:
            is_infinite = np.isinf(values)
            infinite |= is_infinite
            values = np.where(
                is_infinite, np.asarray(diagonals, dtype=np.float64), values
            )
        mean[name] = float(values.mean()) if values.size else float("nan")

    summary = ClassSummary(
        mean=mean,
        n_cases=len(scores),
        n_infinite=int(infinite.sum()),
        infinite_cases=[case_ids[i] for i in np.flatnonzero(infinite)],
    )
    for prediction_empty, truth_empty in empties or []:
        summary.n_empty_prediction += prediction_empty and not truth_empty
        summary.n_empty_truth += truth_empty and not prediction_empty
        summary.n_both_empty += prediction_empty and truth_empty
    return summary


def mean_over_classes(summaries: Mapping[str, ClassSummary]) -> dict[str, float]:
    """The unweighted mean of each metric over classes."""
    names = next(iter(summaries.values())).mean
    return {
        name: float(np.mean([summary.mean[name] for summary in summaries.values()]))
        for name in names
    }
