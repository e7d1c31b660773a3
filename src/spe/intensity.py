"""Intensity standardisation of images before in-context segmentation.

The reverse step compares target images (support) with reference images
(queries). When the target comes from another scanner or protocol, their
intensities differ, and a segmenter that matches appearance can fail even
when the model's predictions are right. Histogram equalisation maps each
image through its own cumulative distribution, which removes every monotone
intensity change (gamma, contrast, window, linear rescaling) exactly, so
support and queries meet on common ground.

A smooth multiplicative shading (a bias field, uneven illumination) is not
monotone over the image, so equalisation cannot remove it; local
standardisation can: each pixel's log intensity minus the local mean, divided
by the local spread, compares structures rather than brightness.

Modes:

- ``"minmax"``: leave intensities as they are (segmenters min-max scale);
- ``"equalize"``: per-image histogram equalisation to [0, 1], on the gray
  version of colour images;
- ``"local"``: local standardisation of log intensities (Gaussian window of
  :data:`LOCAL_SIGMA` of the image side), clipped to 3 standard deviations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from spe.errors import SPEError
from spe.segmenters.base import to_gray

INTENSITY_MODES = ("minmax", "equalize", "local")

#: Width of the local window as a fraction of the longer image side.
LOCAL_SIGMA = 1 / 16


def equalize(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W) float32 in [0, 1]: the empirical CDF.

    Equal input values stay equal; a constant image becomes all zeros.
    """
    gray = to_gray(np.asarray(image))
    values, inverse, counts = np.unique(gray, return_inverse=True, return_counts=True)
    if len(values) == 1:
        return np.zeros(gray.shape, np.float32)

    # Each value maps to the fraction of pixels strictly below it, scaled so
    # the darkest value is 0 and the brightest 1.
    below = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.float64)
    levels = below / below[-1]
    return levels[inverse].reshape(gray.shape).astype(np.float32)


def local_standardize(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W) float32 in [0, 1]: local z-scores.

    Log intensities turn multiplicative shading into an additive offset,
    which subtracting the local mean removes; dividing by the local spread
    removes local contrast. Constant images become zeros.
    """
    gray = to_gray(np.asarray(image)).astype(np.float64)
    low, high = gray.min(), gray.max()
    if high <= low:
        return np.zeros(gray.shape, np.float32)
    logged = np.log1p(255.0 * (gray - low) / (high - low))
    sigma = LOCAL_SIGMA * max(gray.shape)
    centred = logged - ndimage.gaussian_filter(logged, sigma)
    spread = np.sqrt(ndimage.gaussian_filter(centred**2, sigma))
    # The floor keeps flat regions (background) flat instead of amplified noise.
    floor = 0.1 * float(spread.mean()) + 1e-6
    scores = np.clip(centred / np.maximum(spread, floor), -3.0, 3.0)
    return ((scores + 3.0) / 6.0).astype(np.float32)


def standardize(images: Sequence[np.ndarray], mode: str) -> list[np.ndarray]:
    """Apply an intensity mode to 2-D images (see the module docstring)."""
    if mode == "minmax":
        return list(images)
    if mode == "equalize":
        return [equalize(image) for image in images]
    if mode == "local":
        return [local_standardize(image) for image in images]
    message = f"intensity mode {mode!r}: choose one of {', '.join(INTENSITY_MODES)}"
    raise SPEError(message)
