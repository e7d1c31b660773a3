"""Support selection from predictions: area, cap, seed, slices of volumes."""

from __future__ import annotations

import numpy as np

from spe.cases import Case, CaseSet, load_labeled, resolve_task
from spe.support import select_support, slice_axis_for


def case_set(masks, spacing=(1.0, 1.0)):
    cases = [
        Case(f"c{i}", np.full(mask.shape, i, np.uint8), spacing, mask)
        for i, mask in enumerate(masks)
    ]
    return CaseSet(cases=cases, source="test")


def blob(area, shape=(32, 32)):
    mask = np.zeros(shape, np.uint8)
    mask.flat[:area] = 1
    return mask


def test_min_area_and_cap():
    target = case_set([blob(a) for a in (0, 5, 9, 10, 11, 50, 100)])
    support = select_support(target, 1, min_area=10, max_support=64)
    assert support.sources == ["c3", "c4", "c5", "c6"] and support.n_candidates == 4

    capped = select_support(target, 1, min_area=10, max_support=2, seed=3)
    assert len(capped) == 2 and set(capped.sources) <= {"c3", "c4", "c5", "c6"}
    again = select_support(target, 1, min_area=10, max_support=2, seed=3)
    assert again.sources == capped.sources
    other = [
        select_support(
            target, 1, min_area=10, max_support=2, seed=3, repetition=r
        ).sources
        for r in range(6)
    ]
    assert len({tuple(s) for s in other}) > 1  # repetitions draw anew


def test_no_candidate_gives_an_empty_support():
    support = select_support(case_set([blob(0), blob(3)]), 1, min_area=10)
    assert support.is_empty and support.n_candidates == 0


def test_classes_are_selected_separately():
    mask = np.zeros((32, 32), np.uint8)
    mask[:4, :4] = 1  # 16 pixels of class 1
    mask[10:12, :4] = 2  # 8 pixels of class 2
    target = case_set([mask])
    assert len(select_support(target, 1, min_area=10)) == 1
    assert select_support(target, 2, min_area=10).is_empty
    # A binary task stored 0/255 becomes 0/1: class 1 is the foreground.
    binary = case_set([(mask > 0).astype(np.uint8) * 255])
    assert resolve_task([binary]) == ([1], True)
    assert select_support(binary, 1, min_area=20).masks[0].sum() == 24


def test_volume_slices_along_the_largest_spacing(datasets):
    assert slice_axis_for((1.0, 3.0, 1.0)) == 1
    assert slice_axis_for((1.25, 1.25, 1.25)) == 0

    volumes = load_labeled(datasets / "la3d" / "test")
    target = CaseSet(cases=volumes.cases[:2], source="la3d")
    support = select_support(target, 1, min_area=10, max_support=1000, axis=0)
    case = target.cases[0]
    per_slice = (case.mask > 0).sum(axis=(1, 2))
    expected = int((per_slice >= 10).sum()) + int(
        ((target.cases[1].mask > 0).sum(axis=(1, 2)) >= 10).sum()
    )
    assert len(support) == expected
    assert support.images[0].shape == case.image.shape[1:]
    assert support.sources[0].startswith(f"{case.case_id}[axis0=")
