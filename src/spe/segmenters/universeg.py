"""UniverSeg: the in-context segmentation network, and the segmenter that runs it.

UniverSeg (Butoi et al., ICCV 2023) segments a query image from a support set of
(image, binary mask) pairs. :class:`UniverSegNet` is this project's own
implementation of version 1; it loads the official state dict with
``strict=True`` and gives the same logits. :class:`UniverSegSegmenter` puts it
behind the :class:`~spe.segmenters.base.InContextSegmenter` interface.

The network keeps two streams: the query stream (B, C, H, W) and the support
stream, one map per (query, support member) pair, stored flat as
(B * S, C, H, W). A cross block convolves every query map concatenated with
each of its support maps. Convolution is linear, so that convolution splits
into a query term, computed once per query, and a support term, computed once
per pair::

    conv([t; u_i]) = conv_t(t) + conv_u(u_i) + bias

In the first block the support term depends on the support set alone, so
:meth:`UniverSegNet.encode_support` computes it, and the support convolution
applied to it, once for every query that shares the support set. This does the
same arithmetic as the official network in a different order: the logits agree
to float32 rounding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spe.errors import SPEError
from spe.segmenters.base import InContextSegmenter, PreparedImages
from spe.weights import file_sha256, load_state_dict, resolve_weights

logger = logging.getLogger(__name__)

#: Channels of every cross block of UniverSeg v1.
WIDTH = 64

#: Input channels of the first cross block: the query image, then a support
#: image and its mask.
FIRST_QUERY_CHANNELS = 1
FIRST_SUPPORT_CHANNELS = 2

ENCODER_BLOCKS = 4
DECODER_BLOCKS = 3

#: Slope of the LeakyReLU after the target and support convolutions.
NEGATIVE_SLOPE = 0.01

#: Height and width the official weights were trained at.
OFFICIAL_IMAGE_SIZE = (128, 128)

#: Each pooling halves the size, so height and width must divide by this.
SIZE_MULTIPLE = 2 ** (ENCODER_BLOCKS - 1)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

CHANNELS_LAST = torch.channels_last


# ---------------------------------------------------------------------------
# The network


def _holder(**children: nn.Module) -> nn.Module:
    """A bare module holding ``children``; it exists to give the official names."""
    holder = nn.Module()
    for name, child in children.items():
        holder.add_module(name, child)
    return holder


def _activate(maps: torch.Tensor) -> torch.Tensor:
    """LeakyReLU in place: the maps are fresh convolution outputs nobody shares."""
    return F.leaky_relu_(maps, NEGATIVE_SLOPE)


def _channels_last(maps: torch.Tensor) -> torch.Tensor:
    """``maps`` in channels-last layout (no copy when already there)."""
    return maps.contiguous(memory_format=CHANNELS_LAST)


def _member_mean(maps: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * S, C, H, W) -> (B, C, H, W): the mean over each query's S members."""
    # Reduce over the members in channels-last memory order, where each member
    # is one contiguous block; reducing the 5-D strided view is several times
    # slower.
    pixels_last = _channels_last(maps).permute(0, 2, 3, 1)
    mean = pixels_last.reshape(batch, -1, *pixels_last.shape[1:]).mean(dim=1)
    return mean.permute(0, 3, 1, 2)


class CrossBlock(nn.Module):
    """One UniverSeg cross block: cross, target and support convolutions.

    The state dict names are the official ones: ``cross.cross_conv``,
    ``target.vmapped.conv`` and ``support.vmapped.conv``.
    """

    def __init__(self, query_channels: int, support_channels: int) -> None:
        super().__init__()
        self.query_channels = query_channels
        cross_conv = nn.Conv2d(query_channels + support_channels, WIDTH, 3, padding=1)
        target_conv = nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
        support_conv = nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
        self.cross = _holder(cross_conv=cross_conv)
        self.target = _holder(vmapped=_holder(conv=target_conv))
        self.support = _holder(vmapped=_holder(conv=support_conv))

    @property
    def cross_conv(self) -> nn.Conv2d:
        return self.cross.cross_conv

    @property
    def target_conv(self) -> nn.Conv2d:
        return self.target.vmapped.conv

    @property
    def support_conv(self) -> nn.Conv2d:
        return self.support.vmapped.conv

    def query_term(self, target: torch.Tensor) -> torch.Tensor:
        """The query half of the cross convolution, without bias: (B, 64, h, w)."""
        weight = self.cross_conv.weight[:, : self.query_channels]
        return F.conv2d(target, weight, padding=1)

    def support_term(self, support: torch.Tensor) -> torch.Tensor:
        """The support half of the cross convolution, with its bias: (N, 64, h, w)."""
        weight = self.cross_conv.weight[:, self.query_channels :]
        return F.conv2d(support, weight, self.cross_conv.bias, padding=1)

    def forward(
        self, target: torch.Tensor, support: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams through the block.

        Args:
            target: (B, Cq, h, w) query stream.
            support: (B * S, Cs, h, w) support stream, the S members of query b
                at rows b * S to (b + 1) * S - 1.

        Returns:
            The new query stream (B, 64, h, w) and support stream
            (B * S, 64, h, w).
        """
        batch = target.shape[0]

        # One interaction map per pair: its support term plus its query's term.
        interactions = self.support_term(support)
        paired = interactions.view(batch, -1, *interactions.shape[1:])
        paired.add_(self.query_term(target).unsqueeze(1))

        # The query stream goes on from the mean interaction.
        new_target = _activate(self.target_conv(_member_mean(interactions, batch)))

        new_support = _activate(self.support_conv(interactions))
        return new_target, new_support


@dataclass(frozen=True)
class SupportEncoding:
    """What the first cross block computes from support sets alone.

    G is the number of support sets: 1 when every query shares one, else one
    per query. Both tensors are in channels-last layout.

    Attributes:
        cross_mean: (G, 64, H, W) support half of the first cross convolution,
            plus its bias, averaged over the members.
        support_maps: (G, S, 64, H, W) the first support convolution, with its
            bias, applied to each member's support half (plus bias) of the
            first cross convolution; the query's share is added per query.
    """

    cross_mean: torch.Tensor
    support_maps: torch.Tensor

    @property
    def members(self) -> int:
        """S, the number of members in each support set."""
        return self.support_maps.shape[1]


class UniverSegNet(nn.Module):
    """UniverSeg v1 (1,182,785 parameters), with the official state dict names.

    Images are (B, 1, H, W) float32 in [0, 1], each min-max scaled on its own;
    H and W must be multiples of 8 (128 for the official weights). Masks are
    in {0, 1}. The output is logits (B, 1, H, W); probabilities are their
    sigmoid. The support order does not change the output.
    """

    def __init__(self) -> None:
        super().__init__()
        encoder = [CrossBlock(FIRST_QUERY_CHANNELS, FIRST_SUPPORT_CHANNELS)]
        encoder += [CrossBlock(WIDTH, WIDTH) for _ in range(ENCODER_BLOCKS - 1)]
        self.enc_blocks = nn.ModuleList(encoder)

        # Decoder blocks see the upsampled streams with their skips appended.
        self.dec_blocks = nn.ModuleList(
            CrossBlock(2 * WIDTH, 2 * WIDTH) for _ in range(DECODER_BLOCKS)
        )
        self.out_conv = _holder(conv=nn.Conv2d(WIDTH, 1, 1))

    def forward(
        self,
        target: torch.Tensor,
        support_images: torch.Tensor,
        support_labels: torch.Tensor,
    ) -> torch.Tensor:
        """Logits of each query given its own support set.

        Args:
            target: (B, 1, H, W) query images in [0, 1].
            support_images: (B, S, 1, H, W) support images in [0, 1].
            support_labels: (B, S, 1, H, W) support masks in {0, 1}.

        Returns:
            (B, 1, H, W) float logits.
        """
        _check_inputs(target, support_images, support_labels)

        # The support stream starts as each image stacked with its mask.
        support = torch.cat([support_images, support_labels], dim=2).flatten(0, 1)
        target, support = self.enc_blocks[0](
            _channels_last(target), _channels_last(support)
        )
        return self._after_first_block(target, support)

    def encode_support(
        self, support_images: torch.Tensor, support_labels: torch.Tensor
    ) -> SupportEncoding:
        """The query-independent part of the first cross block, for reuse.

        Worth it when several queries share a support set: the first block's
        support convolution then runs once per member instead of once per
        (query, member) pair.

        Args:
            support_images: (G, S, 1, H, W) support images in [0, 1].
            support_labels: (G, S, 1, H, W) support masks in {0, 1}.
        """
        _check_support(support_images, support_labels)
        groups, members = support_images.shape[:2]
        block = self.enc_blocks[0]

        # Support half of the cross convolution for every member.
        support = torch.cat([support_images, support_labels], dim=2).flatten(0, 1)
        cross = block.support_term(_channels_last(support))
        cross_mean = _member_mean(cross, groups)

        # The support convolution is linear too: its share from the support
        # half can be computed now and the query's share added later.
        support_maps = block.support_conv(cross)
        return SupportEncoding(
            cross_mean=cross_mean,
            support_maps=support_maps.view(groups, members, *support_maps.shape[1:]),
        )

    def forward_encoded(
        self, target: torch.Tensor, encoding: SupportEncoding
    ) -> torch.Tensor:
        """Logits of queries given an encoded support set.

        Args:
            target: (B, 1, H, W) query images in [0, 1].
            encoding: from :meth:`encode_support`, with G = 1 (shared by all B
                queries) or G = B.

        Returns:
            (B, 1, H, W) float logits, the same as :meth:`forward` gives.
        """
        groups = encoding.support_maps.shape[0]
        if target.ndim != 4 or groups not in (1, target.shape[0]):
            message = (
                f"queries of shape {tuple(target.shape)} do not fit a support "
                f"encoding of {groups} support sets; give (B, 1, H, W) with B = "
                f"{groups} or an encoding of one support set"
            )
            raise ValueError(message)
        block = self.enc_blocks[0]
        target = _channels_last(target)

        # The query's share of the cross convolution, then the query stream.
        query_term = block.query_term(target)
        new_target = _activate(block.target_conv(query_term + encoding.cross_mean))

        # The query's share of the support convolution (its bias is already in
        # the encoding), added to every member's share.
        query_share = F.conv2d(query_term, block.support_conv.weight, padding=1)
        support = encoding.support_maps + query_share.unsqueeze(1)
        support = _activate(support.flatten(0, 1))
        return self._after_first_block(new_target, support)

    def _after_first_block(
        self, target: torch.Tensor, support: torch.Tensor
    ) -> torch.Tensor:
        """Logits from the first block's (B, 64, H, W) and (B * S, 64, H, W)."""
        # Encoder: keep each level's streams as skips, then halve them.
        skips = []
        for block in self.enc_blocks[1:]:
            skips.append((target, support))
            target = F.max_pool2d(target, 2)
            support = F.max_pool2d(support, 2)
            target, support = block(target, support)

        # Decoder: double the streams and append the skips, deepest first;
        # each skip is freed as soon as it is copied in.
        for block in self.dec_blocks:
            skip_target, skip_support = skips.pop()
            target = torch.cat([_upsample(target, skip_target), skip_target], dim=1)
            support = torch.cat([_upsample(support, skip_support), skip_support], dim=1)
            del skip_target, skip_support
            target, support = block(target, support)

        return self.out_conv.conv(target).contiguous()


def _upsample(maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``maps`` resized bilinearly (corners aligned) to the size of ``like``."""
    return F.interpolate(
        maps, size=like.shape[-2:], mode="bilinear", align_corners=True
    )


def _check_support(support_images: torch.Tensor, support_labels: torch.Tensor) -> None:
    """Raise ValueError unless images and labels are matching (G, S, 1, H, W)."""
    if support_images.ndim != 5 or support_images.shape[2] != 1:
        message = (
            f"support images must be (B, S, 1, H, W), got {tuple(support_images.shape)}"
        )
        raise ValueError(message)
    if support_labels.shape != support_images.shape:
        message = (
            f"support labels {tuple(support_labels.shape)} must have the shape of "
            f"the support images {tuple(support_images.shape)}"
        )
        raise ValueError(message)
    height, width = support_images.shape[-2:]
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        message = (
            f"UniverSeg needs heights and widths that are multiples of "
            f"{SIZE_MULTIPLE}, got {height} x {width}"
        )
        raise ValueError(message)


def _check_inputs(
    target: torch.Tensor, support_images: torch.Tensor, support_labels: torch.Tensor
) -> None:
    """Raise ValueError unless the three inputs have the shapes forward needs."""
    _check_support(support_images, support_labels)
    batch, _, _, height, width = support_images.shape
    if tuple(target.shape) != (batch, 1, height, width):
        message = (
            f"queries must be (B, 1, H, W) = {(batch, 1, height, width)} to match "
            f"the support set, got {tuple(target.shape)}"
        )
        raise ValueError(message)


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor in the official state dict."""
    # On the meta device nothing is allocated or initialised.
    with torch.device("meta"):
        network = UniverSegNet()
    return {name: tuple(value.shape) for name, value in network.state_dict().items()}


# ---------------------------------------------------------------------------
# The segmenter


class UniverSegSegmenter(InContextSegmenter):
    """UniverSeg behind the in-context segmenter interface.

    Each query is segmented from at most ``support_size`` members of the
    support set; a larger support set is subsampled at random with ``seed``.
    With ``ensemble`` > 1, the probabilities from that many random subsets are
    averaged (when the support set is no larger than ``support_size`` every
    subset is the whole set, so one pass is made).

    Prepared support masks (area-resized, so fractions) are binarised: a pixel
    is foreground when its fraction is at least ``mask_threshold``.

    Example::

        segmenter = UniverSegSegmenter(weights="universeg_v1_nf64_ss64_STA.pt")
        probabilities = segmenter.segment(images, masks, queries)
    """

    name = "universeg"

    def __init__(
        self,
        *,
        weights: str | Path | None = None,
        image_size: tuple[int, int] = OFFICIAL_IMAGE_SIZE,
        seed: int = 0,
        support_size: int = 64,
        ensemble: int = 1,
        mask_threshold: float = 0.5,
        autocast: str | None = None,
        device: str = "auto",
        batch_size: int = 8,
        pairs_per_pass: int = 64,
    ) -> None:
        """
        Args:
            weights: the official weights file; None looks it up with
                :func:`spe.weights.resolve_weights`.
            image_size: working (height, width), multiples of 8; the official
                weights were trained at 128 x 128.
            seed: chooses the random support subsets.
            support_size: most support members one query is segmented from.
            ensemble: number of random support subsets whose probabilities are
                averaged.
            mask_threshold: foreground fraction at which a resized support mask
                pixel counts as foreground, in (0, 1].
            autocast: None for float32, or "bf16" / "fp16" to run the
                convolutions in that precision (fast on GPUs and on CPUs with
                AMX; the output changes slightly).
            device: "cpu", "cuda" or "auto" (CUDA when available).
            batch_size: most queries per forward pass.
            pairs_per_pass: most (query, support member) pairs per forward
                pass (at least one query per pass); bounds memory, which is
                about 25 MB per pair at 128 x 128 in float32.
        """
        super().__init__(image_size=image_size, seed=seed)
        _check_options(
            image_size=self.image_size,
            support_size=support_size,
            ensemble=ensemble,
            mask_threshold=mask_threshold,
            autocast=autocast,
            batch_size=batch_size,
            pairs_per_pass=pairs_per_pass,
        )
        if self.image_size != OFFICIAL_IMAGE_SIZE:
            logger.warning(
                "UniverSeg runs at %s but its weights were trained at %s",
                self.image_size,
                OFFICIAL_IMAGE_SIZE,
            )
        self.support_size = int(support_size)
        self.ensemble = int(ensemble)
        self.mask_threshold = float(mask_threshold)
        self.autocast = autocast
        self.device = _resolve_device(device)
        self.batch_size = int(batch_size)
        self.pairs_per_pass = int(pairs_per_pass)

        # Loading onto meta-device parameters skips a useless random init.
        self.weights_path = resolve_weights(weights)
        self.weights_sha256 = file_sha256(self.weights_path)
        state = load_state_dict(self.weights_path, state_dict_shapes())
        with torch.device("meta"):
            network = UniverSegNet()
        network.load_state_dict(state, strict=True, assign=True)
        self.network = network.eval().to(self.device, memory_format=CHANNELS_LAST)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "weights_sha256": self.weights_sha256,
            "support_size": self.support_size,
            "ensemble": self.ensemble,
            "mask_threshold": self.mask_threshold,
            "autocast": self.autocast,
        }

    # -- support subsets ------------------------------------------------------

    def support_subsets(self, count: int) -> list[torch.Tensor]:
        """Indices of the support members each ensemble pass uses.

        Args:
            count: the number of members in the support set.

        Returns:
            Sorted int64 index tensors of length ``min(count, support_size)``:
            one, all of ``range(count)``, when the whole set fits, else
            ``ensemble`` random subsets drawn with ``seed``.
        """
        if count <= self.support_size:
            if self.ensemble > 1:
                logger.debug(
                    "support set of %d fits support_size %d: one pass, no ensemble",
                    count,
                    self.support_size,
                )
            return [torch.arange(count)]
        generator = torch.Generator().manual_seed(self.seed)
        return [
            torch.randperm(count, generator=generator)[: self.support_size]
            .sort()
            .values
            for _ in range(self.ensemble)
        ]

    # -- segmentation ---------------------------------------------------------

    def segment_prepared(
        self,
        support: PreparedImages,
        support_masks: torch.Tensor,
        queries: PreparedImages,
    ) -> torch.Tensor:
        self._check_prepared(support, support_masks, queries)
        if len(support) == 0:
            raise SPEError("the support set is empty; give at least one image and mask")
        labels = self._binarise(support_masks)
        subsets = self.support_subsets(len(support))
        members = len(subsets[0])
        per_pass = max(1, min(self.batch_size, self.pairs_per_pass // members))

        # Sum each query's probabilities over the subsets, then average.
        total = torch.zeros((len(queries), *self.image_size), dtype=torch.float32)
        with self._inference():
            for subset in subsets:
                encoding = self.network.encode_support(
                    self._to_device(support.pixels[subset]).unsqueeze(0),
                    self._to_device(labels[subset]).unsqueeze(0),
                )
                for start in range(0, len(queries), per_pass):
                    stop = min(start + per_pass, len(queries))
                    logits = self.network.forward_encoded(
                        self._to_device(queries.pixels[start:stop]), encoding
                    )
                    total[start:stop] += self._probabilities(logits)
                del encoding
        return total / len(subsets)

    def _segment_pairs(
        self,
        support: PreparedImages,
        support_masks: torch.Tensor,
        queries: PreparedImages,
    ) -> torch.Tensor:
        """Each pair is one batch element with a support set of one."""
        self._check_prepared(support, support_masks, queries)
        labels = self._binarise(support_masks)
        per_pass = max(1, min(self.batch_size, self.pairs_per_pass))

        # Each pair is a batch element with a support set of one.
        probabilities = torch.empty((len(queries), *self.image_size))
        with self._inference():
            for start in range(0, len(queries), per_pass):
                stop = min(start + per_pass, len(queries))
                logits = self.network(
                    self._to_device(queries.pixels[start:stop]),
                    self._to_device(support.pixels[start:stop]).unsqueeze(1),
                    self._to_device(labels[start:stop]).unsqueeze(1),
                )
                probabilities[start:stop] = self._probabilities(logits)
        return probabilities

    # -- helpers --------------------------------------------------------------

    def _binarise(self, masks: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) foreground fractions -> float32 masks in {0, 1}."""
        return (masks >= self.mask_threshold).to(torch.float32)

    def _to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(self.device, non_blocking=True)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) logits -> (B, H, W) float32 probabilities on the CPU."""
        return torch.sigmoid(logits[:, 0].float()).cpu()

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """No autograd, and the chosen autocast precision if any."""
        with torch.inference_mode():
            if self.autocast is None:
                yield
                return
            dtype = AUTOCAST_DTYPES[self.autocast]
            with torch.autocast(device_type=self.device.type, dtype=dtype):
                yield

    def _check_prepared(
        self,
        support: PreparedImages,
        support_masks: torch.Tensor,
        queries: PreparedImages,
    ) -> None:
        """Raise ValueError unless the prepared inputs fit this segmenter."""
        expected = (len(support), 1, *self.image_size)
        if tuple(support_masks.shape) != expected:
            message = (
                f"support masks must be {expected} to match the prepared support, "
                f"got {tuple(support_masks.shape)}"
            )
            raise ValueError(message)
        for prepared in (support, queries):
            if tuple(prepared.pixels.shape[1:]) != (1, *self.image_size):
                message = (
                    f"prepared images must be (N, 1, *{self.image_size}), got "
                    f"{tuple(prepared.pixels.shape)}; prepare them with this segmenter"
                )
                raise ValueError(message)


def _check_options(
    *,
    image_size: tuple[int, int],
    support_size: int,
    ensemble: int,
    mask_threshold: float,
    autocast: str | None,
    batch_size: int,
    pairs_per_pass: int,
) -> None:
    """Raise SPEError naming an option of the segmenter that is invalid."""
    if min(image_size) < SIZE_MULTIPLE or any(n % SIZE_MULTIPLE for n in image_size):
        message = (
            f"UniverSeg image_size {image_size} must be multiples of "
            f"{SIZE_MULTIPLE}; its weights expect {OFFICIAL_IMAGE_SIZE}"
        )
        raise SPEError(message)
    for name, value in (
        ("support_size", support_size),
        ("ensemble", ensemble),
        ("batch_size", batch_size),
        ("pairs_per_pass", pairs_per_pass),
    ):
        if not isinstance(value, int) or value < 1:
            raise SPEError(
                f"UniverSeg {name} must be a whole number >= 1, got {value!r}"
            )
    if not 0 < mask_threshold <= 1:
        message = f"UniverSeg mask_threshold must be in (0, 1], got {mask_threshold!r}"
        raise SPEError(message)
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        message = (
            f"UniverSeg autocast must be one of {', '.join(AUTOCAST_DTYPES)} or "
            f"None, got {autocast!r}"
        )
        raise SPEError(message)


def _resolve_device(device: str) -> torch.device:
    """The torch device for "cpu", "cuda" (or "cuda:N") or "auto"."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            message = (
                f"device {device!r} asked for but this torch has no usable CUDA "
                f"GPU; use device 'cpu' or 'auto'"
            )
            raise SPEError(message)
        return torch.device(device)
    raise SPEError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'auto'")
