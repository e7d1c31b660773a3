"""Reverse segmentation of the reference set, and the pseudo metrics it gives.

The support set comes from the target images and the model's predictions; the
queries are the labeled reference images. If the predictions are good, the
in-context segmenter reproduces the reference labels well. The pseudo metrics
are the metrics of those reverse segmentations against the reference labels,
averaged over the references.

The reference images are prepared for the segmenter once
(:func:`prepare_reference`) and reused for every support set, which is what
makes scoring twenty checkpoints affordable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spe.cases import CaseSet
from spe.intensity import standardize
from spe.metrics import binary_metrics, class_mask, diagonal_mm, summarize_class
from spe.segmenters import InContextSegmenter, PreparedImages
from spe.segmenters.base import resize_probabilities
from spe.support import SupportSet, take_slice

logger = logging.getLogger(__name__)


@dataclass
class ReferenceSet:
    """Labeled reference cases prepared for one segmenter.

    Attributes:
        cases: the reference cases used (at most ``max_references``).
        prepared: every 2-D query: one per image, or every slice of every
            volume along ``axis``, in case order.
        slices_per_case: how many queries each case contributed.
        axis: slice axis for volumes.
        intensity: the intensity standardisation applied to queries, and to
            every support set segmented against them (see
            :mod:`spe.intensity`).
    """

    cases: CaseSet
    prepared: PreparedImages
    slices_per_case: list[int]
    axis: int
    intensity: str = "minmax"

    @property
    def n_queries(self) -> int:
        return len(self.prepared)


def choose_references(
    reference: CaseSet, *, max_references: int | None, seed: int
) -> CaseSet:
    """At most ``max_references`` cases drawn at random with ``seed``, in order."""
    if max_references is None or len(reference) <= max_references:
        return reference
    rng = np.random.default_rng([seed, 7919])
    chosen = sorted(rng.choice(len(reference), size=max_references, replace=False))
    return CaseSet(
        cases=[reference.cases[i] for i in chosen],
        source=reference.source,
        fingerprint=reference.fingerprint,
    )


def query_slices(cases: CaseSet, axis: int) -> tuple[list[np.ndarray], list[int]]:
    """2-D query images of a case set and how many each case contributed."""
    queries, counts = [], []
    for case in cases.cases:
        if case.is_volume:
            n = case.image.shape[axis]
            queries.extend(take_slice(case.image, axis, i) for i in range(n))
            counts.append(n)
        else:
            queries.append(case.image)
            counts.append(1)
    return queries, counts


def prepare_reference(
    segmenter: InContextSegmenter,
    reference: CaseSet,
    *,
    max_references: int | None = None,
    seed: int = 0,
    axis: int = 0,
    intensity: str = "minmax",
) -> ReferenceSet:
    """Choose and prepare the reference queries once for ``segmenter``."""
    chosen = choose_references(reference, max_references=max_references, seed=seed)
    queries, counts = query_slices(chosen, axis)
    logger.info(
        "prepared %d reference cases (%d queries) for %s",
        len(chosen),
        len(queries),
        segmenter.name,
    )
    return ReferenceSet(
        cases=chosen,
        prepared=segmenter.prepare(standardize(queries, intensity)),
        slices_per_case=counts,
        axis=axis,
        intensity=intensity,
    )


def reverse_segment(
    segmenter: InContextSegmenter, reference: ReferenceSet, support: SupportSet
) -> list[np.ndarray]:
    """Foreground probabilities of every reference case, at its own shape.

    Volumes are segmented slice by slice and stacked back along the axis.
    An empty support gives all-zero probabilities.

    Returns:
        One float32 array in [0, 1] per reference case, of its spatial shape.
    """
    if support.is_empty:
        return [
            np.zeros(case.spatial_shape, np.float32) for case in reference.cases.cases
        ]

    probabilities = segmenter.segment_prepared(
        segmenter.prepare(standardize(support.images, reference.intensity)),
        segmenter.prepare_masks(support.masks),
        reference.prepared,
    )
    per_query = resize_probabilities(probabilities, reference.prepared.sizes)

    results, start = [], 0
    for case, count in zip(
        reference.cases.cases, reference.slices_per_case, strict=True
    ):
        if case.is_volume:
            results.append(
                np.stack(per_query[start : start + count], axis=reference.axis)
            )
        else:
            results.append(per_query[start])
        start += count
    return results


@dataclass
class PseudoMetrics:
    """Pseudo metrics of one support set for one class.

    Attributes:
        mean: metric -> mean over reference cases (infinite distances count
            as the image diagonal).
        per_reference: metric values of each reference case.
        n_support: support pairs used (0: an empty segmentation was scored).
    """

    mean: dict[str, float]
    per_reference: list[dict[str, float]]
    n_support: int


def score_reverse(
    probabilities: Sequence[np.ndarray],
    reference: ReferenceSet,
    label: int,
    *,
    threshold: float = 0.5,
    hd95: str = "max",
    distances: bool = True,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Metrics of binarised reverse segmentations against the reference labels."""
    per_reference, diagonals = [], []
    for case, probability in zip(reference.cases.cases, probabilities, strict=True):
        truth = class_mask(case.mask, label)
        per_reference.append(
            binary_metrics(
                probability >= threshold,
                truth,
                spacing=case.spacing,
                hd95=hd95,
                distances=distances,
            )
        )
        diagonals.append(diagonal_mm(truth.shape, case.spacing))
    summary = summarize_class(per_reference, diagonals)
    return summary.mean, per_reference


def pseudo_metrics(
    segmenter: InContextSegmenter,
    reference: ReferenceSet,
    support: SupportSet,
    label: int,
    *,
    threshold: float = 0.5,
    hd95: str = "max",
) -> PseudoMetrics:
    """Reverse-segment the references with ``support`` and score them."""
    probabilities = reverse_segment(segmenter, reference, support)
    mean, per_reference = score_reverse(
        probabilities, reference, label, threshold=threshold, hd95=hd95
    )
    return PseudoMetrics(mean=mean, per_reference=per_reference, n_support=len(support))
