"""Atlas segmentation: register similar supports to a query, fuse their masks.

The weight-free in-context segmenter of reverse classification accuracy
(Valindria et al., IEEE TMI 2017): every support (image, mask) pair is an
atlas. For each query, the supports most similar to it are registered to it
(affine, then a smooth deformation), their masks are warped with the same
transforms, and the warped masks are averaged, weighted by how well each
warped support image matches the query. A query that is itself in the support
set matches its own copy perfectly, so it gets its own mask back.

All registrations of one call run as one batch (see
:mod:`spe.segmenters.registration`), which on a CPU is far faster than one
registration at a time.

Example::

    segmenter = create("atlas")
    probabilities = segmenter.segment(support_images, support_masks, queries)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from spe.errors import SPEError
from spe.segmenters.base import InContextSegmenter, PreparedImages
from spe.segmenters.registration import (
    RegistrationOptions,
    Size,
    Transform,
    global_ncc,
    local_ncc,
    normalise_locally,
    register,
    registration_input_names,
    registration_inputs,
    resize,
    warp,
)

logger = logging.getLogger(__name__)

#: Side of the downsampled image whose correlation ranks supports for a query.
DESCRIPTOR_SIDE = 32

#: The :attr:`PreparedImages.features` key of that downsampled image.
DESCRIPTOR = "atlas_descriptor"

#: Pairs registered per batch: bounds memory (under 1 MB per pair at
#: 128 x 128) without changing results, since pairs register independently.
PAIRS_PER_BATCH = 256

FUSION_MODES = ("global", "local", "vote")


class AtlasSegmenter(InContextSegmenter):
    """Multi-atlas label propagation by batched registration.

    Args:
        image_size: working resolution (H, W).
        seed: recorded for the calibration file; registration draws no
            random numbers, so every run gives the same output.
        atlases: supports registered to each query: the most similar ones by
            global NCC at 32 x 32.
        fusion: how a query's warped masks are combined: ``"global"`` weights
            each atlas by the NCC of its warped image with the query, both
            first normalised to zero mean and unit deviation in every window
            (so that structure, not brightness, counts); ``"local"`` weights
            each pixel by the NCC of the raw images in a window around it;
            ``"vote"`` averages them equally.
        sharpness: weights are ``exp(sharpness * ncc)``, normalised over the
            atlases; larger trusts the best-matching atlases more.
        fusion_window: side of the window of ``"global"`` and ``"local"``
            fusion, in pixels at the working resolution (odd).
        affine_shrink: the affine stage runs at the working resolution
            divided by each of these factors, coarse to fine.
        deformable_shrink: the same for the deformable stage; empty for
            affine registration only.
        affine_steps, deformable_steps, affine_learning_rate,
        deformable_learning_rate, control_spacing, smoothness, window: see
            :class:`~spe.segmenters.registration.RegistrationOptions`.
    """

    name = "atlas"

    def __init__(
        self,
        *,
        image_size: tuple[int, int] = (128, 128),
        seed: int = 0,
        atlases: int = 8,
        fusion: str = "global",
        sharpness: float = 10.0,
        fusion_window: int = 15,
        affine_shrink: Sequence[int] = (4, 2),
        deformable_shrink: Sequence[int] = (4, 2),
        affine_steps: int = 40,
        deformable_steps: int = 40,
        affine_learning_rate: float = 0.01,
        deformable_learning_rate: float = 0.01,
        control_spacing: int = 4,
        smoothness: float = 0.3,
        window: int = 9,
    ) -> None:
        super().__init__(image_size=image_size, seed=seed)
        self.atlases = int(atlases)
        self.fusion = fusion
        self.sharpness = float(sharpness)
        self.fusion_window = int(fusion_window)
        self.registration = RegistrationOptions(
            affine_levels=self._levels("affine_shrink", affine_shrink),
            affine_steps=int(affine_steps),
            affine_learning_rate=float(affine_learning_rate),
            deformable_levels=self._levels("deformable_shrink", deformable_shrink),
            deformable_steps=int(deformable_steps),
            deformable_learning_rate=float(deformable_learning_rate),
            control_spacing=int(control_spacing),
            smoothness=float(smoothness),
            window=int(window),
        )
        self._check_options()

    def _levels(self, option: str, factors: Sequence[int]) -> tuple[Size, ...]:
        """Image sizes of registration levels: the working size / each factor."""
        height, width = self.image_size
        levels = []
        for factor in factors:
            if int(factor) < 1 or min(height, width) // int(factor) < 4:
                message = (
                    f"{option} factors must be >= 1 and leave at least 4 pixels "
                    f"of the working size {self.image_size}, got {list(factors)}"
                )
                raise SPEError(message)
            levels.append((height // int(factor), width // int(factor)))
        return tuple(levels)

    def _check_options(self) -> None:
        """Raise SPEError naming the first option set out of range."""
        options = self.registration
        problems = []
        if self.atlases < 1:
            problems.append(f"atlases must be at least 1, got {self.atlases}")
        if self.fusion not in FUSION_MODES:
            problems.append(
                f"fusion must be one of {', '.join(FUSION_MODES)}, got {self.fusion!r}"
            )
        for option, value in (
            ("fusion_window", self.fusion_window),
            ("window", options.window),
        ):
            if value < 1 or value % 2 == 0:
                problems.append(
                    f"{option} must be an odd number of pixels, got {value}"
                )
        if not options.affine_levels:
            problems.append("affine_shrink needs at least one factor, such as (4, 2)")
        for option, value in (
            ("affine_steps", options.affine_steps),
            ("deformable_steps", options.deformable_steps),
            ("control_spacing", options.control_spacing),
        ):
            if value < 1:
                problems.append(f"{option} must be at least 1, got {value}")
        for option, value in (
            ("sharpness", self.sharpness),
            ("smoothness", options.smoothness),
            ("affine_learning_rate", options.affine_learning_rate),
            ("deformable_learning_rate", options.deformable_learning_rate),
        ):
            if not value >= 0:
                problems.append(f"{option} must be a number >= 0, got {value}")
        if problems:
            raise SPEError(f"{problems[0]}; change that option of the atlas segmenter")

    def settings(self) -> dict[str, Any]:
        """Every option that changes the output, JSON-serialisable."""
        options = self.registration
        return super().settings() | {
            "atlases": self.atlases,
            "fusion": self.fusion,
            "sharpness": self.sharpness,
            "fusion_window": self.fusion_window,
            "descriptor_side": DESCRIPTOR_SIDE,
            "affine_levels": [list(size) for size in options.affine_levels],
            "affine_steps": options.affine_steps,
            "affine_learning_rate": options.affine_learning_rate,
            "deformable_levels": [list(size) for size in options.deformable_levels],
            "deformable_steps": options.deformable_steps,
            "deformable_learning_rate": options.deformable_learning_rate,
            "control_spacing": options.control_spacing,
            "smoothness": options.smoothness,
            "window": options.window,
        }

    # -- preprocessing --------------------------------------------------------

    def prepare(self, images: Sequence[np.ndarray]) -> PreparedImages:
        """Prepared images with what retrieval and registration read from them.

        Features added, each computed once however often the image is used:

        - ``"atlas_descriptor"``: (N, 1024) the image at 32 x 32 with zero mean
          and unit norm, so that a dot product is the global NCC of two images;
        - ``"atlas_normalisedW"``: (N, 1, H, W) the image normalised over
          windows of the fusion window's side W, for ``"global"`` fusion;
        - the registration inputs of
          :func:`~spe.segmenters.registration.registration_inputs`.
        """
        prepared = super().prepare(images)
        prepared.features.update(self._features(prepared.pixels))
        return prepared

    def _features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The features of :meth:`prepare` for (N, 1, H, W) prepared pixels."""
        features = registration_inputs(pixels, self.registration)

        descriptor = resize(pixels, (DESCRIPTOR_SIDE, DESCRIPTOR_SIDE)).flatten(1)
        descriptor = descriptor - descriptor.mean(dim=1, keepdim=True)
        norm = descriptor.norm(dim=1, keepdim=True)

        # A constant image has no direction; it stays zero and ranks last.
        features[DESCRIPTOR] = descriptor / norm.clamp_min(1e-8)

        features[self._structure_key()] = normalise_locally(pixels, self.fusion_window)
        return features

    def _structure_key(self) -> str:
        """The features key of the locally normalised image of global fusion."""
        return f"atlas_normalised{self.fusion_window}"

    def _with_features(self, images: PreparedImages) -> PreparedImages:
        """``images`` with this segmenter's features, computed if missing.

        Images prepared by another segmenter, or by one with other settings,
        lack some of them.
        """
        needed = [
            *registration_input_names(self.registration),
            DESCRIPTOR,
            self._structure_key(),
        ]
        if any(name not in images.features for name in needed):
            images.features.update(self._features(images.pixels))
        return images

    # -- segmentation ---------------------------------------------------------

    def segment_prepared(
        self,
        support: PreparedImages,
        support_masks: torch.Tensor,
        queries: PreparedImages,
    ) -> torch.Tensor:
        """Fuse the warped masks of each query's most similar supports.

        Returns:
            (Q, H, W) float32 probabilities in [0, 1] at the working resolution.
        """
        if len(support) == 0:
            raise SPEError("the support set is empty; give at least one image and mask")
        if len(queries) == 0:
            return torch.zeros((0, *self.image_size), dtype=torch.float32)
        support = self._with_features(support)
        queries = self._with_features(queries)

        # The most similar supports of each query, by global NCC at 32 x 32.
        atlases = min(self.atlases, len(support))
        similarity = queries.features[DESCRIPTOR] @ support.features[DESCRIPTOR].T
        chosen = similarity.topk(atlases, dim=1).indices
        logger.debug(
            "registering %d atlases to each of %d queries", atlases, len(queries)
        )

        # Every (query, atlas) pair, a query's atlases side by side.
        query_index = torch.arange(len(queries)).repeat_interleave(atlases)
        warped_masks, scores = self._propagate(
            support, support_masks, queries, chosen.flatten(), query_index
        )
        return self._fuse(warped_masks, scores, atlases=atlases)

    def _segment_pairs(
        self,
        support: PreparedImages,
        support_masks: torch.Tensor,
        queries: PreparedImages,
    ) -> torch.Tensor:
        """Warp support mask i onto query i, for every i, in one batch."""
        support = self._with_features(support)
        queries = self._with_features(queries)

        pairs = torch.arange(len(queries))
        warped_masks, scores = self._propagate(
            support, support_masks, queries, pairs, pairs
        )
        return self._fuse(warped_masks, scores, atlases=1)

    def _propagate(
        self,
        support: PreparedImages,
        support_masks: torch.Tensor,
        queries: PreparedImages,
        support_index: torch.Tensor,
        query_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Register support ``support_index[p]`` to query ``query_index[p]``.

        Returns:
            warped support masks (P, 1, H, W) in [0, 1], and scores (P, 1, H, W)
            or (P, 1, 1, 1): how well each warped support image matches its
            query, as the fusion mode measures it.
        """
        names = registration_input_names(self.registration)
        warped_masks, scores = [], []
        for start in range(0, len(query_index), PAIRS_PER_BATCH):
            query_batch = query_index[start : start + PAIRS_PER_BATCH]
            support_batch = support_index[start : start + PAIRS_PER_BATCH]
            transform = register(
                {name: queries.features[name][query_batch] for name in names},
                {name: support.features[name][support_batch] for name in names},
                self.registration,
            )

            # Outside the support image is background for its mask.
            warped_masks.append(
                warp(support_masks[support_batch], transform, padding="zeros")
            )
            scores.append(
                self._score(queries, support, query_batch, support_batch, transform)
            )
        return torch.cat(warped_masks), torch.cat(scores)

    def _score(
        self,
        queries: PreparedImages,
        support: PreparedImages,
        query_index: torch.Tensor,
        support_index: torch.Tensor,
        transform: Transform,
    ) -> torch.Tensor:
        """How well each warped support matches its query, in [-1, 1].

        Returns:
            (P, 1, H, W) for ``"local"`` fusion, else (P, 1, 1, 1).
        """
        if self.fusion == "local":
            warped = warp(support.pixels[support_index], transform)
            return local_ncc(queries.pixels[query_index], warped, self.fusion_window)
        if self.fusion == "global":
            key = self._structure_key()
            warped = warp(support.features[key][support_index], transform)
            return global_ncc(queries.features[key][query_index], warped).view(
                -1, 1, 1, 1
            )
        return torch.zeros((len(query_index), 1, 1, 1))

    def _fuse(
        self, warped_masks: torch.Tensor, scores: torch.Tensor, *, atlases: int
    ) -> torch.Tensor:
        """(Q, H, W) weighted mean of each query's ``atlases`` warped masks."""
        height, width = warped_masks.shape[-2:]
        warped_masks = warped_masks.view(-1, atlases, height, width)
        scores = scores.view(-1, atlases, *scores.shape[-2:])
        weights = torch.softmax(self.sharpness * scores, dim=1)
        return (weights * warped_masks).sum(dim=1).clamp(0, 1)
