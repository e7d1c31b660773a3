"""The atlas segmenter and its batched registration, on real chest X-rays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spe.errors import SPEError
from spe.io import open_labeled_folder, read_image, read_mask
from spe.metrics import binary_metrics
from spe.segmenters import create
from spe.segmenters.atlas import AtlasSegmenter
from spe.segmenters.registration import (
    RegistrationOptions,
    global_ncc,
    identity,
    local_ncc,
    register,
    registration_inputs,
    warp,
)

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
JSRT_TRAIN = DATASETS / "jsrt" / "train"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run single-threaded: registering a few pairs gains nothing from threads,
    and on a busy CPU OpenMP's spin-waiting makes its many small steps several
    times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def jsrt() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first 12 JSRT training cases: (128, 128) uint8 images, bool heart masks."""
    if not JSRT_TRAIN.is_dir():
        pytest.skip(f"the shared datasets are not at {DATASETS}")
    folder = open_labeled_folder(JSRT_TRAIN)
    case_ids = folder.case_ids[:12]
    images = [read_image(folder.images[case]).array for case in case_ids]
    masks = [read_mask(folder.labels[case]).array > 0 for case in case_ids]
    return images, masks


def dice(probabilities: np.ndarray, truth: np.ndarray) -> float:
    return binary_metrics(probabilities > 0.5, truth)["dice"]


# ---------------------------------------------------------------------------
# The segmenter


def test_a_query_in_the_support_set_gets_its_own_mask(jsrt):
    images, masks = jsrt
    segmenter = create("atlas")

    probabilities = segmenter.segment(images[:8], masks[:8], images[:8])

    for probability, truth in zip(probabilities, masks[:8], strict=True):
        assert dice(probability, truth) > 0.95


def test_segments_unseen_queries_well(jsrt):
    images, masks = jsrt
    segmenter = create("atlas")

    probabilities = segmenter.segment(images[:8], masks[:8], images[8:12])

    scores = [dice(p, t) for p, t in zip(probabilities, masks[8:12], strict=True)]
    assert np.mean(scores) > 0.8


def test_worse_support_masks_give_worse_segmentations(jsrt):
    images, masks = jsrt
    segmenter = create("atlas")
    shifted = [np.roll(mask, 12, axis=1) for mask in masks[:8]]

    good = segmenter.segment(images[:8], masks[:8], images[8:12])
    bad = segmenter.segment(images[:8], shifted, images[8:12])

    good_dice = np.mean([dice(p, t) for p, t in zip(good, masks[8:12], strict=True)])
    bad_dice = np.mean([dice(p, t) for p, t in zip(bad, masks[8:12], strict=True)])
    assert bad_dice < good_dice - 0.1


def test_blank_support_masks_give_a_blank_output(jsrt):
    images, _ = jsrt
    blank = [np.zeros(image.shape, dtype=bool) for image in images[:4]]

    probabilities = create("atlas").segment(images[:4], blank, images[4:6])

    assert all(probability.max() == 0 for probability in probabilities)


def test_constant_images_give_finite_probabilities(jsrt):
    _, masks = jsrt
    constant = [np.full((128, 128), 7, dtype=np.uint8) for _ in range(3)]

    probabilities = create("atlas").segment(constant, masks[:3], constant[:2])

    for probability in probabilities:
        assert np.isfinite(probability).all()
        assert probability.min() >= 0 and probability.max() <= 1


def test_the_same_seed_gives_the_same_output(jsrt):
    images, masks = jsrt

    first = create("atlas", seed=3).segment(images[:6], masks[:6], images[6:8])
    second = create("atlas", seed=3).segment(images[:6], masks[:6], images[6:8])

    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_any_size_gray_or_colour_comes_back_at_the_query_size(jsrt):
    images, masks = jsrt
    rng = np.random.default_rng(0)
    support = [np.asarray(images[0][:100, :90]), np.stack([images[1]] * 3, axis=-1)]
    support_masks = [masks[0][:100, :90], masks[1]]
    queries = [
        rng.integers(0, 255, size=(75, 140, 3), dtype=np.uint8),
        images[2].astype(np.float64) * 40.0 - 3.0,
    ]

    probabilities = create("atlas").segment(support, support_masks, queries)

    assert [p.shape for p in probabilities] == [(75, 140), (128, 128)]
    for probability in probabilities:
        assert probability.dtype == np.float32
        assert probability.min() >= 0 and probability.max() <= 1


def test_segment_paired_agrees_with_single_supports(jsrt):
    images, masks = jsrt
    segmenter = create("atlas")
    support = segmenter.prepare(images[:3])
    support_masks = segmenter.prepare_masks(masks[:3])
    queries = segmenter.prepare(images[3:6])

    paired = segmenter.segment_paired(support, support_masks, queries)

    for i in range(3):
        single = segmenter.segment_prepared(
            support.subset([i]), support_masks[i : i + 1], queries.subset([i])
        )
        torch.testing.assert_close(paired[i : i + 1], single, atol=1e-4, rtol=0)


def test_settings_name_every_option():
    segmenter = AtlasSegmenter(atlases=3, fusion="vote", smoothness=0.5)

    settings = segmenter.settings()

    assert settings["atlases"] == 3
    assert settings["fusion"] == "vote"
    assert settings["smoothness"] == 0.5
    assert {"image_size", "seed", "deformable_steps", "window"} <= set(settings)


@pytest.mark.parametrize(
    "options",
    [{"atlases": 0}, {"fusion": "median"}, {"window": 4}, {"smoothness": -1.0}],
)
def test_bad_options_raise_a_user_error(options):
    with pytest.raises(SPEError):
        AtlasSegmenter(**options)


# ---------------------------------------------------------------------------
# Registration


def test_registration_improves_the_overlap_of_real_pairs(jsrt):
    images, masks = jsrt
    segmenter = create("atlas")
    moving = segmenter.prepare(images[0:6])
    fixed = segmenter.prepare(images[6:12])
    moving_masks = segmenter.prepare_masks(masks[0:6])
    fixed_masks = segmenter.prepare_masks(masks[6:12]).numpy()[:, 0] > 0.5

    transform = register(fixed.features, moving.features, segmenter.registration)
    warped = warp(moving_masks, transform, padding="zeros").numpy()[:, 0]

    unregistered = moving_masks.numpy()[:, 0]
    before = [dice(m, t) for m, t in zip(unregistered, fixed_masks, strict=True)]
    after = [dice(m, t) for m, t in zip(warped, fixed_masks, strict=True)]
    assert np.mean(after) > np.mean(before) + 0.1, (before, after)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_registering_an_image_to_itself_stays_within_a_fraction_of_a_pixel(jsrt):
    images, _ = jsrt
    pixels = create("atlas").prepare(images[:2]).pixels
    options = RegistrationOptions()
    inputs = registration_inputs(pixels, options)

    transform = register(inputs, inputs, options)

    size = tuple(pixels.shape[-2:])
    unmoved = identity(2).grid(size)
    shift_pixels = (transform.grid(size) - unmoved).abs() * (size[0] / 2)
    assert shift_pixels.max() < 0.25


def test_correlations_of_constant_images_are_zero():
    constant = torch.full((2, 1, 16, 16), 0.5)
    texture = torch.rand((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))

    assert torch.equal(global_ncc(constant, texture), torch.zeros(2))
    assert torch.equal(local_ncc(constant, texture, 5), torch.zeros(2, 1, 16, 16))
