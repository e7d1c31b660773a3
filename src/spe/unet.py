"""A small 2-D UNet, trained on the CPU, that makes checkpoints of varied quality.

``spe reproduce`` needs a segmentation model and many checkpoints of it, from
bad to good, to calibrate and to score the estimator, as in the published
protocol. This module trains one on a labeled folder (2-D images, or 2-D
slices of volumes) and predicts label maps at each image's own size.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spe.cases import Case, CaseSet
from spe.support import take_slice

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# The network


class ConvBlock(nn.Sequential):
    """Two 3 x 3 convolutions, each with batch normalisation and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """UNet with ``depth`` poolings; widths double per level from ``width``.

    Input (B, in_channels, H, W) with H and W divisible by 2**depth; output
    logits (B, n_classes + 1, H, W), channel 0 the background.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 1,
        *,
        width: int = 16,
        depth: int = 4,
    ) -> None:
        super().__init__()
        widths = [width * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList()
        channels = in_channels
        for level_width in widths:
            self.encoder.append(ConvBlock(channels, level_width))
            channels = level_width
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level_width in reversed(widths[:-1]):
            self.upsample.append(nn.ConvTranspose2d(channels, level_width, 2, stride=2))
            self.decoder.append(ConvBlock(2 * level_width, level_width))
            channels = level_width
        self.head = nn.Conv2d(channels, n_classes + 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, block in enumerate(self.encoder):
            x = block(x)
            if index < len(self.encoder) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for upsample, block, skip in zip(
            self.upsample, self.decoder, reversed(skips), strict=True
        ):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


# ---------------------------------------------------------------------------
# Data


@dataclass
class TrainingSettings:
    """How the UNet is trained and which checkpoints are kept.

    Attributes:
        epochs: passes over the training slices.
        width: channels of the first level (doubling per level).
        image_size: side of the square the network works at (pixels).
        batch_size: slices per step.
        learning_rate: Adam's step size.
        n_saved: checkpoints saved along training, spaced geometrically in
            steps so that early (poor) and late (good) models are both kept.
        seed: seeds initialisation and shuffling.
        augment: random brightness and contrast during training.
    """

    epochs: int = 30
    width: int = 16
    image_size: int = 128
    batch_size: int = 16
    learning_rate: float = 2e-3
    n_saved: int = 40
    seed: int = 0
    augment: bool = True


def normalise_image(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (C, H, W) float32 min-max scaled per channel."""
    array = image.astype(np.float32)
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)[:3]
    low = array.min(axis=(1, 2), keepdims=True)
    span = array.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (array - low) / np.where(span > 0, span, 1), 0.0)


def slices_of(case: Case, axis: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The 2-D (image, mask) pairs of a case: itself, or its slices."""
    if not case.is_volume:
        return [(case.image, case.mask)]
    return [
        (
            take_slice(case.image, axis, i),
            None if case.mask is None else take_slice(case.mask, axis, i),
        )
        for i in range(case.image.shape[axis])
    ]


def to_tensors(
    pairs: Sequence[tuple[np.ndarray, np.ndarray | None]],
    classes: Sequence[int],
    size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (N, C, size, size) and targets (N, size, size) of class indices."""
    images = []
    for image, _ in pairs:
        tensor = torch.from_numpy(normalise_image(image))[None]
        images.append(
            F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)
        )
    if any(mask is None for _, mask in pairs):
        return torch.cat(images), None

    targets = []
    for _, mask in pairs:
        index = np.zeros(mask.shape, np.int64)
        for position, label in enumerate(classes, start=1):
            index[mask == label] = position
        tensor = torch.from_numpy(index)[None, None].float()
        targets.append(F.interpolate(tensor, size=(size, size), mode="nearest")[0, 0])
    return torch.cat(images), torch.stack(targets).long()


# ---------------------------------------------------------------------------
# Training


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes."""
    probabilities = logits.softmax(dim=1)[:, 1:]
    one_hot = F.one_hot(targets, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    overlap = (probabilities * one_hot).sum(dim=(0, 2, 3))
    total = probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    return 1 - ((2 * overlap + 1) / (total + 1)).mean()


def save_steps(total_steps: int, n_saved: int) -> list[int]:
    """Steps (1-based) at which to save: geometric, so early models are kept."""
    steps = np.unique(np.geomspace(1, total_steps, n_saved).round().astype(int))
    return [int(s) for s in steps]


@dataclass
class TrainedModel:
    """A trained UNet and its checkpoints (state dicts in memory)."""

    network: UNet
    checkpoints: list[dict[str, torch.Tensor]]
    steps: list[int]
    classes: list[int]
    settings: TrainingSettings
    axis: int


def train_unet(
    training: CaseSet,
    classes: Sequence[int],
    settings: TrainingSettings,
    *,
    axis: int = 0,
    progress: Callable | None = None,
) -> TrainedModel:
    """Train on every 2-D image or slice of ``training``; keep checkpoints."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    pairs = [pair for case in training.cases for pair in slices_of(case, axis)]
    images, targets = to_tensors(pairs, classes, settings.image_size)
    network = UNet(images.shape[1], len(classes), width=settings.width)
    optimiser = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)

    steps_per_epoch = math.ceil(len(images) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    to_save = set(save_steps(total, settings.n_saved))
    checkpoints, saved_steps = [], []
    step = 0
    epochs = range(settings.epochs)
    for _ in progress(epochs) if progress else epochs:
        network.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            inputs = images[batch]
            if settings.augment:
                inputs = augment(inputs, generator)
            logits = network(inputs)
            loss = F.cross_entropy(logits, targets[batch]) + dice_loss(
                logits, targets[batch]
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            if step in to_save:
                checkpoints.append(copy.deepcopy(network.state_dict()))
                saved_steps.append(step)
    logger.info(
        "trained %d steps on %d slices; %d checkpoints",
        step,
        len(images),
        len(checkpoints),
    )
    return TrainedModel(
        network, checkpoints, saved_steps, list(classes), settings, axis
    )


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random brightness and contrast per image: cheap, label-preserving."""
    n = images.shape[0]
    gain = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    offset = 0.1 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    return images * gain + offset


# ---------------------------------------------------------------------------
# Prediction


@dataclass
class NetworkInputs:
    """Cases made ready for the network once, reused for every checkpoint.

    Attributes:
        images: (N, C, size, size) normalised 2-D images or slices.
        shapes: each slice's own (height, width), to upsample back to.
    """

    images: torch.Tensor
    shapes: list[tuple[int, int]]


def network_inputs(model: TrainedModel, cases: CaseSet) -> NetworkInputs:
    """Every 2-D image or slice of every case, resized and normalised."""
    slices = [image for case in cases.cases for image, _ in slices_of(case, model.axis)]
    images, _ = to_tensors(
        [(image, None) for image in slices], model.classes, model.settings.image_size
    )
    return NetworkInputs(images, [image.shape[:2] for image in slices])


def predict(
    model: TrainedModel,
    checkpoint: int,
    cases: CaseSet,
    *,
    inputs: NetworkInputs | None = None,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Label maps (uint8, class labels) of every case at its own shape.

    Args:
        inputs: ``network_inputs(model, cases)``, when already computed.
    """
    network = model.network
    network.load_state_dict(model.checkpoints[checkpoint])
    network.eval()
    labels = np.asarray([0, *model.classes], dtype=np.uint8)
    inputs = inputs or network_inputs(model, cases)

    per_slice: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(inputs.images), batch_size):
            logits = network(inputs.images[start : start + batch_size])
            shapes = inputs.shapes[start : start + batch_size]

            # Slices of one shape are upsampled together.
            classes = [None] * len(shapes)
            for shape in set(shapes):
                members = [i for i, s in enumerate(shapes) if s == shape]
                upsampled = F.interpolate(logits[members], size=shape, mode="bilinear")
                for member, index in zip(members, upsampled.argmax(dim=1), strict=True):
                    classes[member] = labels[index.numpy()]
            per_slice.extend(classes)

    predictions, start = {}, 0
    for case in cases.cases:
        if case.is_volume:
            count = case.image.shape[model.axis]
            predictions[case.case_id] = np.stack(
                per_slice[start : start + count], axis=model.axis
            )
        else:
            count = 1
            predictions[case.case_id] = per_slice[start]
        start += count
    return predictions
