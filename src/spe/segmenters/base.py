"""The interface every in-context segmenter implements, and its preprocessing.

An in-context segmenter takes a support set of (image, binary mask) pairs and
segments query images with no training. Every segmenter works at a fixed
working resolution (128 x 128 by default): images are made gray, resized and
min-max scaled to [0, 1] once by :meth:`InContextSegmenter.prepare`, so that a
caller that segments the same queries with many support sets (one per model
checkpoint) pays for the preprocessing once.

Shapes used throughout:

- prepared images: ``pixels`` (N, 1, H, W) float32 in [0, 1] at the working
  resolution (H, W);
- prepared masks: (N, 1, H, W) float32 in [0, 1] (area-resized binary masks);
- probabilities: (Q, H, W) float32 in [0, 1] at the working resolution, or a
  list of (h_i, w_i) arrays at each query's own size from :meth:`segment`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from spe.errors import SPEError

# ITU-R BT.601 luma weights: how a colour image becomes gray.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass
class PreparedImages:
    """Images at a segmenter's working resolution, ready to segment.

    Attributes:
        pixels: (N, 1, H, W) float32 tensor, each image min-max scaled to [0, 1]
            (a constant image becomes all zeros).
        sizes: the original (height, width) of each image, to resize results
            back.
        features: per-segmenter extras computed once with the images (for
            example descriptors for retrieval); keys are segmenter-specific.
    """

    pixels: torch.Tensor
    sizes: list[tuple[int, int]]
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> PreparedImages:
        """The images at ``indices``, in that order, with their features."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return PreparedImages(
            pixels=self.pixels[index],
            sizes=[self.sizes[i] for i in index.tolist()],
            features={name: value[index] for name, value in self.features.items()},
        )


# ---------------------------------------------------------------------------
# Preprocessing shared by every segmenter


def to_gray(image: np.ndarray) -> np.ndarray:
    """A 2-D float32 array from a (H, W) gray or (H, W, 3|4) colour image."""
    if image.ndim == 2:
        return image.astype(np.float32, copy=False)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        rgb = image[..., :3].astype(np.float32, copy=False)
        return rgb @ np.asarray(LUMA_WEIGHTS, dtype=np.float32)
    message = (
        f"an in-context segmenter takes 2-D gray (H, W) or colour (H, W, 3) images, "
        f"got shape {image.shape}; slice 3-D volumes first"
    )
    raise SPEError(message)


def min_max_scale(pixels: torch.Tensor) -> torch.Tensor:
    """Scale each image of (N, 1, H, W) to [0, 1]; constant images become 0."""
    flat = pixels.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1, 1)
    span = high - low

    # A constant image has no contrast to scale; zeros keep NaN out.
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (pixels - low) / safe_span, torch.zeros_like(pixels))


def resize_images(images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Gray images of any sizes -> (N, 1, H, W) float32, antialiased, [0, 1]."""
    resized = []
    for image in images:
        gray = torch.from_numpy(np.ascontiguousarray(to_gray(np.asarray(image))))
        gray = gray[None, None]
        if tuple(gray.shape[-2:]) != tuple(size):
            gray = F.interpolate(
                gray, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        resized.append(gray)
    if not resized:
        return torch.zeros((0, 1, *size), dtype=torch.float32)
    return min_max_scale(torch.cat(resized))


def resize_masks(masks: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Binary masks of any sizes -> (N, 1, H, W) float32 foreground fractions.

    Area interpolation keeps the fraction of foreground under each output
    pixel, so thin structures fade rather than vanish.
    """
    resized = []
    for mask in masks:
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise SPEError(f"support masks must be 2-D (H, W), got shape {mask.shape}")
        binary = torch.from_numpy((mask > 0).astype(np.float32))[None, None]
        if tuple(binary.shape[-2:]) != tuple(size):
            binary = F.interpolate(binary, size=size, mode="area")
        resized.append(binary)
    if not resized:
        return torch.zeros((0, 1, *size), dtype=torch.float32)
    return torch.cat(resized)


def resize_probabilities(
    probabilities: torch.Tensor, sizes: Sequence[tuple[int, int]]
) -> list[np.ndarray]:
    """(Q, H, W) probabilities -> a list of (h_i, w_i) float32 arrays."""
    results = []
    for probability, size in zip(probabilities, sizes, strict=True):
        if tuple(probability.shape) != tuple(size):
            probability = F.interpolate(
                probability[None, None], size=size, mode="bilinear", align_corners=False
            )[0, 0]
        results.append(probability.clamp(0, 1).cpu().numpy().astype(np.float32))
    return results


# ---------------------------------------------------------------------------
# The interface


class InContextSegmenter(abc.ABC):
    """Segments queries from a support set of (image, mask) pairs, untrained.

    Subclasses implement :meth:`segment_prepared`; they may extend
    :meth:`prepare` to compute per-image features once, and override
    :meth:`_segment_pairs` (behind :meth:`segment_paired`) with a faster
    batched version.
    """

    #: Short name used on the command line and in calibration files.
    name: ClassVar[str]

    def __init__(
        self, *, image_size: tuple[int, int] = (128, 128), seed: int = 0
    ) -> None:
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)

    # -- what a calibration file records --------------------------------------

    def settings(self) -> dict[str, Any]:
        """The settings that change this segmenter's output (JSON-serialisable).

        A calibration made with one set of settings is only valid for the
        same settings; subclasses add their own keys.
        """
        return {"image_size": list(self.image_size), "seed": self.seed}

    # -- preprocessing --------------------------------------------------------

    def prepare(self, images: Sequence[np.ndarray]) -> PreparedImages:
        """Gray, resized, min-max scaled images; see :class:`PreparedImages`.

        Args:
            images: 2-D arrays (H, W) or colour arrays (H, W, 3), any sizes.
        """
        sizes = [tuple(np.asarray(image).shape[:2]) for image in images]
        pixels = resize_images(images, self.image_size)
        return PreparedImages(pixels=pixels, sizes=sizes)

    def prepare_masks(self, masks: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, 1, H, W) float32 masks at the working resolution, values in [0, 1]."""
        return resize_masks(masks, self.image_size)

    # -- segmentation ---------------------------------------------------------

    @abc.abstractmethod
    def segment_prepared(
        self,
        support: PreparedImages,
        support_masks: torch.Tensor,
        queries: PreparedImages,
    ) -> torch.Tensor:
        """Foreground probabilities of each query given the whole support set.

        Callers do not wrap this in ``torch.inference_mode``: a segmenter that
        optimises (registration) needs autograd, so each one chooses its mode.

        Args:
            support: S prepared support images.
            support_masks: (S, 1, H, W) float32 masks in [0, 1].
            queries: Q prepared query images.

        Returns:
            (Q, H, W) float32 probabilities in [0, 1] at the working resolution.
        """

    def segment_paired(
        self,
        support: PreparedImages,
        support_masks: torch.Tensor,
        queries: PreparedImages,
    ) -> torch.Tensor:
        """Segment query i with support member i alone, for every i.

        This is the single-image support of per-image quality estimation;
        ``support`` and ``queries`` have the same length N.

        Returns:
            (N, H, W) float32 probabilities in [0, 1] at the working resolution.
        """
        if len(support) != len(queries):
            raise ValueError("segment_paired needs as many supports as queries")
        if len(queries) == 0:
            return torch.zeros((0, *self.image_size), dtype=torch.float32)
        return self._segment_pairs(support, support_masks, queries)

    def _segment_pairs(
        self,
        support: PreparedImages,
        support_masks: torch.Tensor,
        queries: PreparedImages,
    ) -> torch.Tensor:
        """:meth:`segment_paired` for N >= 1 checked pairs.

        This default makes one :meth:`segment_prepared` call per pair;
        segmenters override it with a batched version.
        """
        return torch.cat(
            [
                self.segment_prepared(
                    support.subset([i]), support_masks[i : i + 1], queries.subset([i])
                )
                for i in range(len(queries))
            ]
        )

    def segment(
        self,
        support_images: Sequence[np.ndarray],
        support_masks: Sequence[np.ndarray],
        queries: Sequence[np.ndarray],
    ) -> list[np.ndarray]:
        """Segment 2-D queries of any size given a support set of any sizes.

        Args:
            support_images: S arrays (h, w) or (h, w, 3), any intensity range.
            support_masks: S binary arrays (h, w); value > 0 is foreground.
            queries: Q arrays (h, w) or (h, w, 3).

        Returns:
            Q float32 probability arrays in [0, 1], each at its query's size.
        """
        if len(support_images) != len(support_masks):
            message = (
                f"got {len(support_images)} support images but "
                f"{len(support_masks)} support masks; give one mask per image"
            )
            raise SPEError(message)
        if len(support_images) == 0:
            raise SPEError("the support set is empty; give at least one image and mask")
        for image, mask in zip(support_images, support_masks, strict=True):
            if tuple(np.asarray(image).shape[:2]) != tuple(np.asarray(mask).shape[:2]):
                message = (
                    f"a support image of shape {np.asarray(image).shape} has a mask "
                    f"of shape {np.asarray(mask).shape}; they must match"
                )
                raise SPEError(message)

        prepared_queries = self.prepare(queries)
        probabilities = self.segment_prepared(
            self.prepare(support_images),
            self.prepare_masks(support_masks),
            prepared_queries,
        )
        return resize_probabilities(probabilities, prepared_queries.sizes)
