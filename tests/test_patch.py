"""The patch label fusion segmenter, on real chest X-rays, ultrasound and colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spe.errors import SPEError
from spe.io import open_labeled_folder, read_image, read_mask
from spe.metrics import binary_metrics
from spe.segmenters import create
from spe.segmenters.patch import PatchFusionSegmenter, box_sum, register_affine

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

Cases = tuple[list[np.ndarray], list[np.ndarray]]


def load_cases(dataset: str, count: int) -> Cases:
    """The first ``count`` training cases: images as stored, boolean masks."""
    root = DATASETS / dataset / "train"
    if not root.is_dir():
        pytest.fail(f"the shared datasets are missing at {DATASETS}")
    folder = open_labeled_folder(root)
    case_ids = folder.case_ids[:count]
    images = [read_image(folder.images[case]).array for case in case_ids]
    masks = [read_mask(folder.labels[case]).array > 0 for case in case_ids]
    return images, masks


@pytest.fixture(scope="module")
def jsrt() -> Cases:
    """16 chest X-rays, (128, 128) uint8, with heart masks."""
    return load_cases("jsrt", 16)


@pytest.fixture(scope="module")
def hc18() -> Cases:
    """6 fetal head ultrasound images, about (173, 256) uint8."""
    return load_cases("hc18", 6)


@pytest.fixture(scope="module")
def kvasir() -> Cases:
    """4 colonoscopy frames, (h, 256, 3) uint8 RGB of varied heights."""
    return load_cases("kvasir", 4)


def dice(probabilities: np.ndarray, truth: np.ndarray) -> float:
    return binary_metrics(probabilities > 0.5, truth, distances=False)["dice"]


# ---------------------------------------------------------------------------
# What reverse segmentation relies on


def test_query_in_the_support_set_gets_its_own_mask_back(jsrt, hc18):
    segmenter = create("patch")
    for images, masks in (jsrt, hc18):
        support_images, support_masks = images[:6], masks[:6]

        results = segmenter.segment(support_images, support_masks, images[:3])

        for result, truth in zip(results, masks[:3], strict=True):
            assert dice(result, truth) > 0.95


def test_unseen_chest_xrays_are_segmented_well(jsrt):
    images, masks = jsrt
    segmenter = create("patch")

    results = segmenter.segment(images[:10], masks[:10], images[10:])

    scores = [dice(r, t) for r, t in zip(results, masks[10:], strict=True)]
    assert np.mean(scores) > 0.8


def test_blank_support_masks_give_a_blank_output(jsrt):
    images, masks = jsrt
    blank = [np.zeros_like(mask) for mask in masks[:6]]
    segmenter = create("patch")

    results = segmenter.segment(images[:6], blank, images[6:9])

    for result in results:
        assert result.max() < 1e-6
        assert not (result > 0.5).any()


def test_worse_support_masks_give_worse_segmentations(jsrt):
    images, masks = jsrt
    # A consistent error: every support mask shifted 20 pixels to the right.
    shifted = [np.roll(mask, 20, axis=1) for mask in masks[:10]]
    segmenter = create("patch")

    good = segmenter.segment(images[:10], masks[:10], images[10:])
    bad = segmenter.segment(images[:10], shifted, images[10:])

    good_dice = np.mean([dice(r, t) for r, t in zip(good, masks[10:], strict=True)])
    bad_dice = np.mean([dice(r, t) for r, t in zip(bad, masks[10:], strict=True)])
    assert bad_dice < good_dice - 0.2


# ---------------------------------------------------------------------------
# Robustness and the common interface


def test_constant_images_give_no_nan(jsrt):
    images, masks = jsrt
    flat = [np.full((128, 128), 7, dtype=np.uint8), np.zeros((90, 60), np.uint8)]
    flat_masks = [masks[0], np.ones((90, 60), bool)]
    segmenter = create("patch")

    all_flat = segmenter.segment(flat, flat_masks, flat)
    flat_query = segmenter.segment(images[:4], masks[:4], flat)
    flat_support = segmenter.segment(
        flat + images[:2], flat_masks + masks[:2], images[2:4]
    )

    for result in all_flat + flat_query + flat_support:
        assert np.isfinite(result).all()
        assert result.min() >= 0 and result.max() <= 1


def test_same_seed_gives_identical_results(hc18):
    images, masks = hc18

    first = create("patch", seed=3).segment(images[:4], masks[:4], images[4:])
    second = create("patch", seed=3).segment(images[:4], masks[:4], images[4:])

    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_any_size_gray_or_colour_gives_probabilities_at_the_query_size(hc18, kvasir):
    gray_images, gray_masks = hc18
    colour_images, colour_masks = kvasir
    queries = [colour_images[0], gray_images[0], gray_images[1][:100, :77]]
    segmenter = create("patch")

    results = segmenter.segment(
        gray_images[2:] + colour_images[1:], gray_masks[2:] + colour_masks[1:], queries
    )

    assert len(results) == len(queries)
    for result, query in zip(results, queries, strict=True):
        assert result.shape == query.shape[:2]
        assert result.dtype == np.float32
        assert result.min() >= 0 and result.max() <= 1


def test_other_working_sizes_work(jsrt):
    images, masks = jsrt
    segmenter = create("patch", image_size=(48, 40), level_shrinks=(4, 2, 1))

    results = segmenter.segment(images[:6], masks[:6], images[:2])

    assert dice(results[0], masks[0]) > 0.9
    assert results[1].shape == (128, 128)


def test_segment_paired_agrees_with_single_supports(jsrt):
    images, masks = jsrt
    segmenter = create("patch")
    support = segmenter.prepare(images[:4])
    support_masks = segmenter.prepare_masks(masks[:4])
    queries = segmenter.prepare(images[4:8])

    paired = segmenter.segment_paired(support, support_masks, queries)

    assert paired.shape == (4, 128, 128)
    for i in range(4):
        alone = segmenter.segment_prepared(
            support.subset([i]), support_masks[i : i + 1], queries.subset([i])
        )
        torch.testing.assert_close(paired[i], alone[0], atol=1e-5, rtol=0)


def test_images_prepared_by_another_segmenter_are_completed(jsrt):
    images, masks = jsrt
    segmenter = create("patch")
    support = segmenter.prepare(images[:6])
    masks_prepared = segmenter.prepare_masks(masks[:6])
    bare = segmenter.prepare(images[:2])
    bare.features.clear()

    result = segmenter.segment_prepared(support, masks_prepared, bare)

    expected = segmenter.segment_prepared(
        support, masks_prepared, segmenter.prepare(images[:2])
    )
    torch.testing.assert_close(result, expected)


# ---------------------------------------------------------------------------
# Options and building blocks


def test_settings_record_every_option():
    segmenter = create("patch", k=4, bandwidth=3.0, align=False)

    settings = segmenter.settings()

    assert isinstance(segmenter, PatchFusionSegmenter)
    assert settings["k"] == 4
    assert settings["bandwidth"] == 3.0
    assert settings["align"] is False
    assert settings["image_size"] == [128, 128]


@pytest.mark.parametrize(
    "options",
    [
        {"k": 0},
        {"patch_radius": -1},
        {"bandwidth": 0.0},
        {"level_shrinks": (2, 4)},
        {"level_shrinks": (2, 2)},
        {"level_shrinks": ()},
    ],
)
def test_out_of_range_options_are_user_errors(options):
    with pytest.raises(SPEError, match=next(iter(options))):
        create("patch", **options)


def test_an_empty_support_set_is_a_user_error():
    segmenter = create("patch")
    empty = segmenter.prepare([])

    with pytest.raises(SPEError, match="empty"):
        segmenter.segment_prepared(empty, torch.zeros(0, 1, 128, 128), empty)


def test_box_sum_adds_the_window_cut_at_the_border():
    image = torch.arange(20, dtype=torch.float32).view(4, 5)

    summed = box_sum(image, 1)

    assert summed[1, 1] == image[:3, :3].sum()
    assert summed[0, 0] == image[:2, :2].sum()
    assert summed[3, 4] == image[2:, 3:].sum()


def test_registration_recovers_a_known_shift(jsrt):
    images, _ = jsrt
    segmenter = create("patch")
    fixed = segmenter.prepare(images[:1]).features["patch_registration"]
    # The moving image is the fixed one moved right by 2 of its 32 pixels.
    moving = torch.nn.functional.pad(fixed[..., :-2], (2, 0, 0, 0), mode="replicate")

    alignment = register_affine(fixed, moving)

    shift = alignment.transforms[0, 0, 2].item() * fixed.shape[-1] / 2
    assert shift == pytest.approx(2.0, abs=0.3)
    assert alignment.residuals[0] < 0.1
