"""Support selection: which (image, predicted mask) pairs the segmenter learns from.

From a target set (images and a model's predictions) the candidates are the
2-D images, or the 2-D slices of 3-D volumes along one axis, whose predicted
mask of the class has at least ``min_area`` foreground pixels. At most
``max_support`` of them are drawn at random with a seed. When no candidate
qualifies (the model predicted nothing), the support is empty and the reverse
step scores an empty segmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spe.cases import Case, CaseSet
from spe.metrics import class_mask


@dataclass
class SupportSet:
    """Support pairs for one class.

    Attributes:
        images: 2-D arrays (H, W) or (H, W, C), as stored.
        masks: boolean (H, W) masks of the class.
        sources: where each pair came from: the case id, with ``[axis=i]`` for
            a slice of a volume.
        n_candidates: how many images or slices qualified before the cap.
    """

    images: list[np.ndarray]
    masks: list[np.ndarray]
    sources: list[str]
    n_candidates: int

    def __len__(self) -> int:
        return len(self.images)

    @property
    def is_empty(self) -> bool:
        return not self.images


def slice_axis_for(spacing: Sequence[float]) -> int:
    """The axis of a volume to slice along: the one with the largest spacing.

    Ties go to the first axis, which is the slice axis of most scans in
    (Z, Y, X) order.
    """
    return int(np.argmax(np.asarray(spacing)))


def take_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2-D slice ``index`` of a (Z, Y, X) array along ``axis``."""
    return np.take(array, index, axis=axis)


def foreground_areas(
    case: Case, label: int, *, axis: int
) -> list[tuple[str, int | None, int]]:
    """(source, slice index or None, foreground pixels) of each 2-D candidate."""
    mask = class_mask(case.mask, label)
    if not case.is_volume:
        return [(case.case_id, None, int(np.count_nonzero(mask)))]
    other_axes = tuple(a for a in range(3) if a != axis)
    per_slice = np.count_nonzero(mask, axis=other_axes)
    return [
        (f"{case.case_id}[axis{axis}={index}]", index, int(area))
        for index, area in enumerate(per_slice)
    ]


def select_support(
    target: CaseSet,
    label: int,
    *,
    min_area: int = 10,
    max_support: int = 64,
    seed: int = 0,
    repetition: int = 0,
    axis: int = 0,
) -> SupportSet:
    """Draw the support set of one class from a target set's predictions.

    Args:
        target: cases whose ``mask`` is the model's prediction.
        label: the class (binary tasks are stored 0/1: class 1).
        min_area: least predicted foreground pixels of a candidate.
        max_support: most support pairs; more candidates are subsampled.
        seed, repetition: the random draw; each repetition draws anew.
        axis: the slice axis for volumes (see :func:`slice_axis_for`).
    """
    candidates = []
    for case_index, case in enumerate(target.cases):
        for source, index, area in foreground_areas(case, label, axis=axis):
            if area >= min_area:
                candidates.append((case_index, index, source))

    rng = np.random.default_rng([seed, repetition, label])
    if len(candidates) > max_support:
        chosen = sorted(rng.choice(len(candidates), size=max_support, replace=False))
        selected = [candidates[i] for i in chosen]
    else:
        selected = candidates

    images, masks, sources = [], [], []
    for case_index, index, source in selected:
        case = target.cases[case_index]
        image, mask = case.image, class_mask(case.mask, label)
        if index is not None:
            image, mask = take_slice(image, axis, index), take_slice(mask, axis, index)
        images.append(image)
        masks.append(mask)
        sources.append(source)
    return SupportSet(images, masks, sources, n_candidates=len(candidates))
