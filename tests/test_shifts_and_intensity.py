"""Synthetic shifts keep shape and dtype and are deterministic; equalisation."""

from __future__ import annotations

import numpy as np
import pytest

from spe.intensity import equalize, standardize
from spe.io import read_image
from spe.shifts import FAMILIES, Shift, all_shifts, apply_shift


@pytest.fixture(scope="module")
def chest(datasets):
    return read_image(datasets / "jsrt/test/images/JPCLN002.png").array


def test_every_shift_keeps_shape_dtype_and_seed(chest):
    assert len(all_shifts()) == 35
    for shift in all_shifts():
        shifted = apply_shift(chest, shift, seed=1)
        assert shifted.shape == chest.shape and shifted.dtype == chest.dtype
        np.testing.assert_array_equal(shifted, apply_shift(chest, shift, seed=1))


def test_severity_grows(chest):
    unit = chest.astype(float) / 255
    for family in FAMILIES:
        changes = [
            np.abs(
                apply_shift(chest, Shift(family, s)).astype(float) / 255 - unit
            ).mean()
            for s in (1, 5)
        ]
        assert changes[1] > changes[0], family


def test_volumes_and_colour(datasets):
    volume = read_image(
        datasets
        / "la3d/test/images/"
        / sorted(p.name for p in (datasets / "la3d/test/images").iterdir())[0]
    ).array
    colour = read_image(
        datasets / "kvasir/train/images/cju0qkwl35piu0993l0dewei2.jpg"
    ).array
    for shift in (Shift("jpeg", 3), Shift("resolution", 3), Shift("bias", 3)):
        assert apply_shift(volume, shift, is_volume=True).shape == volume.shape
        assert apply_shift(colour, shift).shape == colour.shape


def test_equalisation_undoes_monotone_changes(chest):
    gamma = apply_shift(chest, Shift("gamma", 3))
    # Gamma merges some dark gray levels when rounded back to 8 bits, so the
    # two equalised images agree closely rather than exactly.
    a, b = equalize(chest), equalize(gamma)
    assert a.min() == 0 and a.max() == 1 and a.dtype == np.float32
    before = np.abs(chest / 255.0 - gamma / 255.0).mean()
    after = np.abs(a - b).mean()
    assert after < before / 10
    assert not equalize(np.full((4, 4), 7)).any()  # constant: zeros, no NaN
    assert standardize([chest], "minmax")[0] is chest


def test_local_standardisation_removes_shading_and_gamma(chest):
    from spe.intensity import local_standardize

    reference = local_standardize(chest)
    assert (
        reference.dtype == np.float32 and 0 <= reference.min() <= reference.max() <= 1
    )
    for shift in (Shift("bias", 5), Shift("gamma", 4)):
        shifted = apply_shift(chest, shift)
        before = np.abs(chest / 255.0 - shifted / 255.0).mean()
        after = np.abs(reference - local_standardize(shifted)).mean()
        assert after < before / 2, shift
    assert not local_standardize(np.full((8, 8), 3.0)).any()


def test_interval_widened_by_disagreement():
    from spe.calibration import widen_by_disagreement

    primary = {"estimate": 0.8, "low": 0.77, "high": 0.83}
    widened = widen_by_disagreement(primary, {"estimate": 0.76}, "dice")
    half = (0.03**2 + 0.04**2) ** 0.5  # 0.05
    assert widened["low"] == pytest.approx(0.8 - half)
    assert widened["high"] == pytest.approx(0.8 + half)
    assert widened["disagreement"] == pytest.approx(0.04)
    # Clipped to the metric's range.
    top = widen_by_disagreement(
        {"estimate": 0.99, "low": 0.98, "high": 1.0}, {"estimate": 0.9}, "dice"
    )
    assert top["high"] == 1.0
