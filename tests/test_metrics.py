"""The metric definitions and conventions of docs/metrics.md, as test vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spe.metrics import (
    METRIC_NAMES,
    binary_metrics,
    boundary,
    diagonal_mm,
    directed_distances,
    find_classes,
    summarize_class,
)


def square(shape, box):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[box] = 1
    return mask


# T1: two 8x8 squares shifted by two rows.
def test_t1_shifted_square():
    truth = square((32, 32), np.s_[8:16, 8:16])
    prediction = square((32, 32), np.s_[10:18, 8:16])
    scores = binary_metrics(prediction, truth)
    assert scores["dice"] == pytest.approx(0.75)
    assert scores["jaccard"] == pytest.approx(0.6)
    assert scores["precision"] == pytest.approx(0.75)
    assert scores["recall"] == pytest.approx(0.75)
    assert scores["pearson"] == pytest.approx(0.733333, abs=1e-6)
    assert scores["hd95"] == pytest.approx(2.0)
    assert scores["assd"] == pytest.approx(1.0)
    assert binary_metrics(prediction, truth, spacing=(3, 1))["hd95"] == pytest.approx(6)
    assert binary_metrics(prediction, truth, spacing=(1, 3))["hd95"] == pytest.approx(2)


# T2: a far-away false positive blob moves HD95 (max) but not the union variant.
def test_t2_outlier_blob():
    truth = square((64, 64), np.s_[10:30, 10:30])
    prediction = truth.copy()
    prediction[50:53, 50:53] = 1
    scores = binary_metrics(prediction, truth)
    assert scores["dice"] == pytest.approx(0.988875, abs=1e-6)
    assert scores["recall"] == 1.0
    assert scores["pearson"] == pytest.approx(0.987732, abs=1e-6)
    assert scores["assd"] == pytest.approx(1.556237, abs=1e-6)
    assert scores["hd95"] == pytest.approx(31.035171, abs=1e-6)
    union = binary_metrics(prediction, truth, hd95="union")["hd95"]
    assert union == pytest.approx(1.484924, abs=1e-6)
    forward, backward = directed_distances(prediction > 0, truth > 0, (1.0, 1.0))
    assert max(forward.max(), backward.max()) == pytest.approx(32.526912, abs=1e-6)


# T3: a 3-D shift along the anisotropic axis.
def test_t3_volume_spacing():
    truth = square((20, 40, 40), np.s_[5:15, 10:30, 10:30])
    prediction = np.roll(truth, 1, axis=0)
    assert binary_metrics(prediction, truth, spacing=(5, 1, 1))["hd95"] == 5.0
    assert binary_metrics(prediction, truth)["hd95"] == 1.0


# T4: the empty-mask table.
def test_t4_both_empty():
    empty = np.zeros((16, 16), dtype=np.uint8)
    scores = binary_metrics(empty, empty)
    assert {name: scores[name] for name in METRIC_NAMES} == {
        "dice": 1.0,
        "jaccard": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "pearson": 1.0,
        "hd95": 0.0,
        "assd": 0.0,
    }


@pytest.mark.parametrize("empty_side", ["truth", "prediction"])
def test_t4_one_empty(empty_side):
    mask = square((16, 16), np.s_[4:8, 4:8])
    empty = np.zeros_like(mask)
    prediction, truth = (mask, empty) if empty_side == "truth" else (empty, mask)
    scores = binary_metrics(prediction, truth)
    for name in ("dice", "jaccard", "precision", "recall", "pearson"):
        assert scores[name] == 0.0
    assert math.isinf(scores["hd95"]) and math.isinf(scores["assd"])


def test_t4_constant_mask_pearson_is_zero():
    truth = square((16, 16), np.s_[4:8, 4:8])
    full = np.ones_like(truth)
    assert binary_metrics(full, truth)["pearson"] == 0.0
    assert binary_metrics(truth, full)["pearson"] == 0.0
    assert binary_metrics(full, full)["pearson"] == 1.0


# T5: 0/1 against 0/255 encodings.
def test_t5_encodings_are_equal():
    truth = square((32, 32), np.s_[8:16, 8:16])
    assert binary_metrics(truth * 255, truth)["dice"] == 1.0


# T6: a prediction covering the whole image.
def test_t6_full_prediction_no_nan():
    truth = square((32, 32), np.s_[8:16, 8:16])
    scores = binary_metrics(np.ones_like(truth), truth)
    assert scores["dice"] == pytest.approx(2 * 64 / (64 + 1024))
    assert scores["precision"] == pytest.approx(64 / 1024)
    assert scores["pearson"] == 0.0
    assert all(np.isfinite(value) for value in scores.values())


def test_boundary_is_mask_minus_cross_erosion():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for ndim in (2, 3):
        mask = ndimage.binary_opening(rng.random((12,) * ndim) > 0.4)
        cross = ndimage.generate_binary_structure(ndim, 1)
        expected = mask & ~ndimage.binary_erosion(mask, cross, border_value=0)
        np.testing.assert_array_equal(boundary(mask), expected)


def test_pairwise_and_distance_transform_paths_agree(monkeypatch):
    # The two ways of computing distances (all pairs, distance transforms)
    # must give the same HD95 and ASSD on anisotropic 3-D masks.
    rng = np.random.default_rng(1)
    zz, yy, xx = np.mgrid[:12, :40, :40]
    truth = (zz - 6) ** 2 / 9 + (yy - 20) ** 2 / 100 + (xx - 19) ** 2 / 120 < 1
    prediction = (zz - 5) ** 2 / 8 + (yy - 22) ** 2 / 90 + (xx - 20) ** 2 / 110 < 1
    prediction |= rng.random(truth.shape) > 0.999
    spacing = (3.0, 0.7, 0.9)
    pairwise = binary_metrics(prediction, truth, spacing=spacing)
    monkeypatch.setattr("spe.metrics.MAX_PAIRS_COMPARED", 0)
    transform = binary_metrics(prediction, truth, spacing=spacing)
    for name in ("hd95", "assd"):
        assert pairwise[name] == pytest.approx(transform[name], rel=1e-12)


def test_large_volumes_do_not_overflow():
    # 2e8 voxels' worth of counts would overflow int64 products in MCC.
    truth = np.zeros((200, 200, 200), dtype=bool)
    truth[20:180, 20:180, 20:180] = True
    prediction = np.roll(truth, 3, axis=0)
    scores = binary_metrics(prediction, truth, distances=False)
    assert -1 <= scores["pearson"] <= 1
    assert scores["dice"] == pytest.approx(157 / 160)


def test_summary_counts_infinite_as_diagonal():
    scores = [
        {"dice": 1.0, "hd95": 2.0, "assd": 1.0},
        {"dice": 0.0, "hd95": math.inf, "assd": math.inf},
    ]
    diagonals = [diagonal_mm((30, 40), (1, 1))] * 2
    summary = summarize_class(scores, diagonals, case_ids=["a", "b"])
    assert diagonals[0] == 50.0
    assert summary.mean["hd95"] == pytest.approx((2 + 50) / 2)
    assert summary.mean["dice"] == 0.5
    assert summary.n_infinite == 1 and summary.infinite_cases == ["b"]


def test_find_classes():
    assert find_classes([np.array([0, 255]), np.array([0, 0])]) == [1]
    assert find_classes([np.array([0, 1, 2]), np.array([0, 2])]) == [1, 2]


def test_matches_monai_on_real_masks(datasets):
    # An independent implementation (MONAI, test-only) on real heart masks
    # compared with shifted and eroded copies, with anisotropic spacing.
    monai_metrics = pytest.importorskip("monai.metrics")
    import torch
    from scipy import ndimage

    from spe.io import list_cases, read_mask

    files = list(list_cases(datasets / "jsrt" / "test" / "labels").values())[:6]
    for index, path in enumerate(files):
        truth = read_mask(path).array > 0
        prediction = ndimage.binary_erosion(
            np.roll(truth, index - 3, axis=1), iterations=2
        )
        spacing = (1.0, 1.5) if index % 2 else (1.0, 1.0)
        ours = binary_metrics(prediction, truth, spacing=spacing)
        as_tensor = [
            torch.from_numpy(m[None, None].astype(np.float32))
            for m in (prediction, truth)
        ]
        hd95 = monai_metrics.compute_hausdorff_distance(
            *as_tensor, percentile=95, spacing=spacing
        ).item()
        assd = monai_metrics.compute_average_surface_distance(
            *as_tensor, symmetric=True, spacing=spacing
        ).item()
        dice = monai_metrics.compute_dice(*as_tensor).item()
        assert ours["hd95"] == pytest.approx(hd95, abs=1e-4)
        assert ours["assd"] == pytest.approx(assd, abs=1e-4)
        assert ours["dice"] == pytest.approx(dice, abs=1e-6)
