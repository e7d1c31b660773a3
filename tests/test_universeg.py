"""UniverSeg: exact to the reference logits, and correct behind the interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spe.errors import SPEError
from spe.segmenters import create
from spe.segmenters.universeg import (
    UniverSegNet,
    UniverSegSegmenter,
    state_dict_shapes,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN_WEIGHTS = SHARED / "fixtures" / "universeg" / "universeg_golden_weights.pt"
GOLDEN_IO = SHARED / "fixtures" / "universeg" / "universeg_golden_io.npz"
CASES = ("b1_s3", "b2_s5", "b1_s2_64")

# The fixture's logits come from the reference implementation in float32.
LOGIT_TOLERANCE = 1e-4

# Adapter tests run at 64 x 64, a quarter of the cost of the official size.
SMALL = (64, 64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run on one thread: these tests check numbers, not speed, and their many
    small operations stall on hand-offs between threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden_state() -> dict[str, torch.Tensor]:
    assert GOLDEN_WEIGHTS.is_file(), f"missing fixture {GOLDEN_WEIGHTS}"
    return torch.load(GOLDEN_WEIGHTS, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def golden_io() -> dict[str, torch.Tensor]:
    assert GOLDEN_IO.is_file(), f"missing fixture {GOLDEN_IO}"
    with np.load(GOLDEN_IO) as arrays:
        return {name: torch.from_numpy(arrays[name]) for name in arrays.files}


@pytest.fixture(scope="module")
def network(golden_state: dict[str, torch.Tensor]) -> UniverSegNet:
    network = UniverSegNet()
    network.load_state_dict(golden_state, strict=True)
    return network.eval()


def case_inputs(
    golden_io: dict[str, torch.Tensor], case: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        golden_io[f"{case}_target"],
        golden_io[f"{case}_support_images"],
        golden_io[f"{case}_support_labels"],
    )


def make_segmenter(**options: object) -> UniverSegSegmenter:
    options = {
        "weights": GOLDEN_WEIGHTS,
        "device": "cpu",
        "image_size": SMALL,
        **options,
    }
    return UniverSegSegmenter(**options)


def random_images(
    rng: np.random.Generator, shapes: list[tuple[int, ...]]
) -> list[np.ndarray]:
    return [rng.uniform(0, 255, size=shape).astype(np.float32) for shape in shapes]


def disc_mask(shape: tuple[int, int], radius_fraction: float = 0.3) -> np.ndarray:
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    distance = np.hypot(rows - shape[0] / 2, columns - shape[1] / 2)
    return (distance < radius_fraction * min(shape)).astype(np.uint8)


# ---------------------------------------------------------------------------
# The network


def test_state_dict_has_the_official_names_and_shapes(golden_state):
    expected = {name: tuple(value.shape) for name, value in golden_state.items()}

    assert state_dict_shapes() == expected
    assert sum(value.numel() for value in golden_state.values()) == 1_182_785


@pytest.mark.parametrize("case", CASES)
def test_forward_reproduces_reference_logits(network, golden_io, case):
    with torch.inference_mode():
        logits = network(*case_inputs(golden_io, case))

    expected = golden_io[f"{case}_logits"]
    assert logits.shape == expected.shape
    assert torch.allclose(logits, expected, rtol=0, atol=LOGIT_TOLERANCE)


@pytest.mark.parametrize("case", ["b2_s5", "b1_s2_64"])
def test_encoded_support_gives_the_reference_logits(network, golden_io, case):
    target, support_images, support_labels = case_inputs(golden_io, case)

    with torch.inference_mode():
        encoding = network.encode_support(support_images, support_labels)
        logits = network.forward_encoded(target, encoding)

    expected = golden_io[f"{case}_logits"]
    assert torch.allclose(logits, expected, rtol=0, atol=LOGIT_TOLERANCE)


def test_one_encoded_support_set_serves_a_batch_of_queries(network, golden_io):
    target, support_images, support_labels = case_inputs(golden_io, "b2_s5")
    shared_images, shared_labels = support_images[:1], support_labels[:1]

    with torch.inference_mode():
        encoding = network.encode_support(shared_images, shared_labels)
        shared = network.forward_encoded(target, encoding)
        separate = network(
            target,
            shared_images.expand(2, -1, -1, -1, -1),
            shared_labels.expand(2, -1, -1, -1, -1),
        )

    assert torch.allclose(shared, separate, rtol=0, atol=LOGIT_TOLERANCE)


def test_support_order_does_not_change_the_output(network, golden_io):
    target, support_images, support_labels = case_inputs(golden_io, "b2_s5")
    order = torch.tensor([3, 0, 4, 2, 1])

    with torch.inference_mode():
        logits = network(target, support_images[:, order], support_labels[:, order])

    expected = golden_io["b2_s5_logits"]
    assert torch.allclose(logits, expected, rtol=0, atol=LOGIT_TOLERANCE)


def test_forward_rejects_sizes_that_do_not_pool_evenly(network):
    target = torch.zeros(1, 1, 60, 60)
    support = torch.zeros(1, 2, 1, 60, 60)

    with pytest.raises(ValueError, match="multiples of 8"):
        network(target, support, support)


# ---------------------------------------------------------------------------
# The segmenter


def test_segments_gray_and_colour_images_of_any_size_at_their_own_size():
    rng = np.random.default_rng(0)
    support_shapes = [(70, 90), (64, 64, 3), (100, 50)]
    support_images = random_images(rng, support_shapes)
    support_masks = [disc_mask(shape[:2]) for shape in support_shapes]
    queries = [
        *random_images(rng, [(80, 120), (33, 47, 3)]),
        np.full((50, 60), 7.0, dtype=np.float32),
    ]
    segmenter = create(
        "universeg", weights=GOLDEN_WEIGHTS, device="cpu", image_size=SMALL
    )

    probabilities = segmenter.segment(support_images, support_masks, queries)

    assert [p.shape for p in probabilities] == [(80, 120), (33, 47), (50, 60)]
    for probability in probabilities:
        assert probability.dtype == np.float32
        assert np.isfinite(probability).all()
        assert probability.min() >= 0 and probability.max() <= 1


def test_same_seed_gives_the_same_probabilities():
    rng = np.random.default_rng(1)
    support_images = random_images(rng, [(64, 64)] * 5)
    support_masks = [
        disc_mask((64, 64), radius) for radius in (0.1, 0.2, 0.3, 0.35, 0.4)
    ]
    queries = random_images(rng, [(64, 64)] * 2)

    first = make_segmenter(support_size=2, seed=3)
    second = make_segmenter(support_size=2, seed=3)
    other_seed = make_segmenter(support_size=2, seed=4)

    expected = first.segment(support_images, support_masks, queries)
    for again in (first, second):
        for actual, wanted in zip(
            again.segment(support_images, support_masks, queries), expected, strict=True
        ):
            np.testing.assert_array_equal(actual, wanted)
    assert (
        first.support_subsets(5)[0].tolist()
        != other_seed.support_subsets(5)[0].tolist()
    )


def test_support_subsets_are_capped_sorted_and_deterministic():
    segmenter = make_segmenter(support_size=8, ensemble=3, seed=11)

    subsets = segmenter.support_subsets(100)
    again = make_segmenter(support_size=8, ensemble=3, seed=11).support_subsets(100)

    assert len(subsets) == 3
    for subset, same in zip(subsets, again, strict=True):
        assert subset.tolist() == same.tolist()
        assert len(set(subset.tolist())) == 8
        assert subset.tolist() == sorted(subset.tolist())
        assert subset.min() >= 0 and subset.max() < 100
    assert subsets[0].tolist() != subsets[1].tolist()

    # A support set within the cap is used whole, once, whatever the ensemble.
    assert [s.tolist() for s in segmenter.support_subsets(5)] == [list(range(5))]


def test_ensemble_averages_the_subsets_probabilities():
    rng = np.random.default_rng(2)
    segmenter = make_segmenter(support_size=2, ensemble=2, seed=5)
    support = segmenter.prepare(random_images(rng, [(64, 64)] * 4))
    masks = segmenter.prepare_masks(
        [disc_mask((64, 64), r) for r in (0.1, 0.2, 0.3, 0.4)]
    )
    queries = segmenter.prepare(random_images(rng, [(64, 64)] * 3))
    single = make_segmenter(support_size=4)

    ensemble = segmenter.segment_prepared(support, masks, queries)
    each = [
        single.segment_prepared(support.subset(subset), masks[subset], queries)
        for subset in segmenter.support_subsets(4)
    ]

    assert torch.allclose(ensemble, (each[0] + each[1]) / 2, atol=1e-6)


def test_batched_passes_match_one_query_at_a_time():
    rng = np.random.default_rng(3)
    batched = make_segmenter(batch_size=4)
    one_by_one = make_segmenter(batch_size=1)
    support = batched.prepare(random_images(rng, [(64, 64)] * 3))
    masks = batched.prepare_masks([disc_mask((64, 64), r) for r in (0.2, 0.3, 0.4)])
    queries = batched.prepare(random_images(rng, [(64, 64)] * 3))

    expected = one_by_one.segment_prepared(support, masks, queries)
    actual = batched.segment_prepared(support, masks, queries)

    assert torch.allclose(actual, expected, atol=1e-5)


def test_paired_segmentation_matches_the_unbatched_interface():
    rng = np.random.default_rng(4)
    segmenter = make_segmenter(batch_size=2)
    support = segmenter.prepare(random_images(rng, [(64, 64)] * 3))
    masks = segmenter.prepare_masks([disc_mask((64, 64), r) for r in (0.2, 0.3, 0.4)])
    queries = segmenter.prepare(random_images(rng, [(64, 64)] * 3))

    paired = segmenter.segment_paired(support, masks, queries)
    expected = torch.cat(
        [
            segmenter.segment_prepared(
                support.subset([i]), masks[i : i + 1], queries.subset([i])
            )
            for i in range(3)
        ]
    )

    assert paired.shape == (3, *SMALL)
    assert torch.allclose(paired, expected, atol=1e-5)


def test_resized_masks_are_binarised_at_the_threshold():
    rng = np.random.default_rng(5)
    segmenter = make_segmenter(mask_threshold=0.5)
    support = segmenter.prepare(random_images(rng, [(64, 64)] * 2))
    queries = segmenter.prepare(random_images(rng, [(64, 64)]))
    binary = segmenter.prepare_masks([disc_mask((64, 64), r) for r in (0.2, 0.3)])

    fractional = torch.where(binary > 0, 0.6, 0.4)

    expected = segmenter.segment_prepared(support, binary, queries)
    actual = segmenter.segment_prepared(support, fractional, queries)
    assert torch.equal(actual, expected)


def test_bf16_autocast_stays_close_to_float32():
    rng = np.random.default_rng(6)
    support_images = random_images(rng, [(32, 32)] * 2)
    support_masks = [disc_mask((32, 32), r) for r in (0.2, 0.3)]
    queries = random_images(rng, [(32, 32)] * 2)

    exact = make_segmenter(image_size=(32, 32))
    fast = make_segmenter(image_size=(32, 32), autocast="bf16")

    for reference, approximate in zip(
        exact.segment(support_images, support_masks, queries),
        fast.segment(support_images, support_masks, queries),
        strict=True,
    ):
        assert approximate.dtype == np.float32
        assert np.abs(approximate - reference).max() < 0.05


def test_settings_name_everything_that_changes_the_output():
    settings = make_segmenter(support_size=16, ensemble=2, autocast="bf16").settings()

    assert settings["image_size"] == list(SMALL)
    assert settings["support_size"] == 16
    assert settings["ensemble"] == 2
    assert settings["autocast"] == "bf16"
    assert settings["mask_threshold"] == 0.5
    assert len(settings["weights_sha256"]) == 64
    assert "device" not in settings and "batch_size" not in settings


def test_missing_weights_say_how_to_provide_them(monkeypatch, tmp_path):
    monkeypatch.delenv("SPE_UNIVERSEG_WEIGHTS", raising=False)
    monkeypatch.setenv("SPE_CACHE_DIR", str(tmp_path))

    with pytest.raises(SPEError) as raised:
        UniverSegSegmenter(device="cpu")

    message = str(raised.value)
    assert "\n" not in message
    assert "--universeg-weights PATH" in message
    assert "SPE_UNIVERSEG_WEIGHTS" in message
    assert str(tmp_path) in message


def test_wrongly_shaped_weights_are_named(golden_state, tmp_path):
    state = dict(golden_state)
    state["enc_blocks.0.cross.cross_conv.weight"] = torch.zeros(64, 2, 3, 3)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)

    with pytest.raises(SPEError) as raised:
        make_segmenter(weights=path)

    message = str(raised.value)
    assert str(path) in message
    assert (
        "enc_blocks.0.cross.cross_conv.weight has shape (64, 2, 3, 3) but UniverSeg "
        "expects (64, 3, 3, 3)"
    ) in message


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"image_size": (100, 100)}, "multiples of 8"),
        ({"support_size": 0}, "support_size"),
        ({"ensemble": 0}, "ensemble"),
        ({"mask_threshold": 0.0}, "mask_threshold"),
        ({"autocast": "fp8"}, "autocast"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_invalid_options_are_user_errors(options, fragment):
    with pytest.raises(SPEError, match=fragment):
        make_segmenter(**options)
