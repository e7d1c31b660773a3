"""Synthetic distribution shifts of images: the acquisition changes users meet.

Seven families, five severities each (1 mild ... 5 severe), deterministic
with a seed: Gaussian noise, Gaussian blur, gamma, contrast loss, a smooth
multiplicative bias field, JPEG compression, and downsampling followed by
upsampling. Each works on 2-D gray or colour images and on 3-D volumes
(slice by slice where the operation is 2-D), keeps the shape and the dtype,
and maps intensities through [0, 1] (the image's own range) and back.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

# Severity -> parameter of each family, from mild (1) to severe (5).
SEVERITIES = {
    "noise": (0.03, 0.06, 0.1, 0.15, 0.22),  # noise SD, fraction of the range
    "blur": (0.6, 1.0, 1.6, 2.4, 3.5),  # Gaussian SD in pixels per 128 pixels
    "gamma": (1.5, 2.0, 2.6, 3.3, 4.2),  # intensity exponent
    "contrast": (0.7, 0.5, 0.35, 0.25, 0.15),  # contrast kept around the mean
    "bias": (0.3, 0.5, 0.7, 0.9, 1.2),  # log-amplitude of the bias field
    "jpeg": (40, 25, 15, 8, 4),  # JPEG quality
    "resolution": (2, 3, 4, 6, 8),  # downsampling factor
}
FAMILIES = tuple(SEVERITIES)


@dataclass(frozen=True)
class Shift:
    """One condition: a family at a severity."""

    family: str
    severity: int

    @property
    def name(self) -> str:
        return f"{self.family}-{self.severity}"

    @property
    def parameter(self) -> float:
        return SEVERITIES[self.family][self.severity - 1]


def all_shifts() -> list[Shift]:
    """Every family at every severity (35 conditions)."""
    return [Shift(f, s) for f in FAMILIES for s in range(1, 6)]


def _to_unit(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """float64 in [0, 1] and the (low, high) to map back."""
    array = image.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    span = high - low if high > low else 1.0
    return (array - low) / span, low, span


def _from_unit(
    unit: np.ndarray, low: float, span: float, dtype: np.dtype
) -> np.ndarray:
    """Back to the image's range and dtype (integers rounded and clipped)."""
    array = np.clip(unit, 0.0, 1.0) * span + low
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.round(array), info.min, info.max).astype(dtype)
    return array.astype(dtype)


def _planes(image: np.ndarray, is_volume: bool) -> list[tuple]:
    """Index tuples of the 2-D planes of an image (one for 2-D images)."""
    return [(i,) for i in range(image.shape[0])] if is_volume else [()]


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A smooth random field with unit peak amplitude, zero mean."""
    coarse = rng.standard_normal(tuple(3 for _ in shape))
    zoom = [n / 3 for n in shape]
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest")[
        tuple(slice(0, n) for n in shape)
    ]
    field -= field.mean()
    return field / max(np.abs(field).max(), 1e-9)


def apply_shift(
    image: np.ndarray,
    shift: Shift,
    *,
    seed: int = 0,
    is_volume: bool = False,
) -> np.ndarray:
    """The image under ``shift``; same shape and dtype.

    Args:
        image: (H, W), (H, W, C) colour, or (Z, Y, X) with ``is_volume``.
        shift: the family and severity.
        seed: the random draw (noise, bias field).
    """
    rng = np.random.default_rng([seed, FAMILIES.index(shift.family), shift.severity])
    unit, low, span = _to_unit(image)
    spatial = unit.shape if is_volume or unit.ndim == 2 else unit.shape[:2]
    p = shift.parameter

    if shift.family == "noise":
        shifted = unit + rng.normal(0.0, p, unit.shape)
    elif shift.family == "gamma":
        shifted = unit**p
    elif shift.family == "contrast":
        shifted = unit.mean() + p * (unit - unit.mean())
    elif shift.family == "bias":
        field = np.exp(p * _smooth_field(spatial, rng))
        shifted = unit * (field if unit.ndim == len(spatial) else field[..., None])
        # Rescale instead of clipping: a bias field shades, it does not saturate.
        shifted /= max(float(shifted.max()), 1e-9)
    elif shift.family == "blur":
        sigma = p * max(spatial[-2:]) / 128
        sigmas = [
            0.0 if (is_volume and axis == 0) else sigma for axis in range(len(spatial))
        ]
        sigmas += [0.0] * (unit.ndim - len(spatial))
        shifted = ndimage.gaussian_filter(unit, sigmas)
    elif shift.family == "jpeg":
        shifted = _per_plane(unit, is_volume, lambda plane: _jpeg(plane, int(p)))
    elif shift.family == "resolution":
        shifted = _per_plane(unit, is_volume, lambda plane: _down_up(plane, int(p)))
    else:
        raise ValueError(f"unknown shift family {shift.family!r}")
    return _from_unit(shifted, low, span, image.dtype)


def _per_plane(
    unit: np.ndarray, is_volume: bool, operation: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    result = np.empty_like(unit)
    for index in _planes(unit, is_volume):
        result[index] = operation(unit[index])
    return result


def _jpeg(plane: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode one 2-D gray or colour plane as JPEG."""
    pixels = np.round(np.clip(plane, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded, dtype=np.float64) / 255


def _down_up(plane: np.ndarray, factor: int) -> np.ndarray:
    """Average-downsample by ``factor`` and upsample bilinearly to the shape."""
    height, width = plane.shape[:2]
    small = (max(1, round(width / factor)), max(1, round(height / factor)))
    channels = (
        [plane] if plane.ndim == 2 else [plane[..., c] for c in range(plane.shape[2])]
    )
    restored = []
    for channel in channels:
        image = Image.fromarray(channel.astype(np.float32), mode="F")
        image = image.resize(small, Image.Resampling.BOX)
        restored.append(
            np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
        )
    return restored[0] if plane.ndim == 2 else np.stack(restored, axis=-1)
