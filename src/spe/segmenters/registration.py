"""Batched 2-D image registration in torch: affine, then a smooth deformation.

Every function works on a batch of B independent (fixed, moving) pairs at
once, so that one call registers all atlases of all queries. The pairs never
interact: each pair's loss is summed, not averaged, and Adam scales every
parameter on its own, so a pair registers the same alone as in a batch.

Conventions:

- images: (B, C, H, W) float32, intensities min-max scaled to [0, 1];
- coordinates: torch's normalised sampling coordinates, x then y, from -1 to
  1 across the image (``align_corners=False``), so that a transform found at
  64 x 64 applies unchanged at 128 x 128;
- a transform maps each pixel of the fixed image to the place it samples in
  the moving image (a backward map, as ``grid_sample`` wants).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Local variance (intensity units squared, images in [0, 1]) below which a
#: window counts as flat: it keeps local NCC finite on constant patches.
VARIANCE_FLOOR = 1e-4

#: Keeps global NCC finite on constant images.
NCC_EPSILON = 1e-8

#: Adam's epsilon: gradients much smaller than this move a parameter much
#: less than the learning rate. Adam's default (1e-8) would turn rounding
#: noise at a perfect match into full-size steps, so an image registered to
#: itself would drift. Losses are scaled so that useful gradients are ~0.1-1.
GRADIENT_FLOOR = 1e-3

Size = tuple[int, int]


@dataclass(frozen=True)
class RegistrationOptions:
    """How pairs are registered; every field changes the result.

    Attributes:
        affine_levels: image sizes (H, W), coarse to fine, at which the affine
            transform is optimised.
        affine_steps: Adam steps per affine level.
        affine_learning_rate: Adam step size for the affine parameters
            (normalised coordinates; 0.01 moves ~0.6 pixels at 128 x 128).
        deformable_levels: image sizes, coarse to fine, at which the
            displacement field is optimised; empty for affine only.
        deformable_steps: Adam steps per deformable level.
        deformable_learning_rate: Adam step size for the displacement field.
        control_spacing: pixels between the displacement's control points at
            each level; the field is bilinear between them, which keeps it
            smooth.
        smoothness: weight of the diffusion regulariser, the mean squared
            gradient of the displacement (dimensionless strain).
        window: side of the square window, in pixels (odd), over which each
            image is normalised for the deformable stage (see
            :func:`normalise_locally`).
    """

    affine_levels: tuple[Size, ...] = ((32, 32), (64, 64))
    affine_steps: int = 40
    affine_learning_rate: float = 0.01
    deformable_levels: tuple[Size, ...] = ((32, 32), (64, 64))
    deformable_steps: int = 40
    deformable_learning_rate: float = 0.01
    control_spacing: int = 4
    smoothness: float = 0.3
    window: int = 9


@dataclass
class Transform:
    """An affine map, optionally followed by a displacement, for B pairs.

    Attributes:
        affine: (B, 2, 3) float32 matrices in normalised coordinates.
        displacement: (B, 2, h, w) float32 offsets (x, y) in normalised
            coordinates on a control grid, bilinear in between, or None.
    """

    affine: torch.Tensor
    displacement: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.affine.shape[0]

    def grid(self, size: Size) -> torch.Tensor:
        """(B, H, W, 2) sampling coordinates of the fixed image's pixels."""
        grid = F.affine_grid(self.affine, [len(self), 1, *size], align_corners=False)
        if self.displacement is None:
            return grid
        offsets = F.interpolate(
            self.displacement, size=size, mode="bilinear", align_corners=False
        )
        return grid + offsets.permute(0, 2, 3, 1)


def identity(batch: int) -> Transform:
    """B identity transforms."""
    eye = torch.eye(2, 3, dtype=torch.float32)
    return Transform(affine=eye.expand(batch, 2, 3).clone())


def warp(
    images: torch.Tensor, transform: Transform, *, padding: str = "border"
) -> torch.Tensor:
    """Resample (B, C, H, W) moving images onto the fixed images' grid.

    Args:
        images: moving images or masks, one per pair.
        transform: the pairs' transforms.
        padding: ``"border"`` repeats edge pixels (images), ``"zeros"`` treats
            outside as background (masks).

    Returns:
        (B, C, H, W) warped images, bilinear.
    """
    grid = transform.grid(tuple(images.shape[-2:]))
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode=padding, align_corners=False
    )


# ---------------------------------------------------------------------------
# Similarity


def global_ncc(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """(B,) normalised cross-correlation in [-1, 1] of each pair of images.

    A constant image correlates 0 with anything.
    """
    fixed = fixed.flatten(1)
    moving = moving.flatten(1)
    fixed = fixed - fixed.mean(dim=1, keepdim=True)
    moving = moving - moving.mean(dim=1, keepdim=True)
    energy = (fixed * fixed).sum(dim=1) * (moving * moving).sum(dim=1)
    return (fixed * moving).sum(dim=1) / torch.sqrt(energy + NCC_EPSILON)


def box_mean(images: torch.Tensor, window: int) -> torch.Tensor:
    """(N, C, H, W) mean over a ``window`` x ``window`` box around each pixel.

    Boxes are cut at the border. Two 1-D passes cost 2 * window additions per
    pixel instead of window squared.
    """
    rows = F.avg_pool2d(
        images, (1, window), stride=1, padding=(0, window // 2), count_include_pad=False
    )
    return F.avg_pool2d(
        rows, (window, 1), stride=1, padding=(window // 2, 0), count_include_pad=False
    )


def local_ncc(fixed: torch.Tensor, moving: torch.Tensor, window: int) -> torch.Tensor:
    """(B, 1, H, W) NCC in [-1, 1] over a square window around every pixel.

    Windows are cut at the image border. A window whose variance is near the
    floor in either image scores near 0, so flat regions neither reward nor
    punish a match.
    """
    if window % 2 == 0:
        raise ValueError(f"the local NCC window must be odd, got {window}")

    fixed = fixed.mean(dim=1, keepdim=True)
    moving = moving.mean(dim=1, keepdim=True)
    fixed_mean = box_mean(fixed, window)
    moving_mean = box_mean(moving, window)
    covariance = box_mean(fixed * moving, window) - fixed_mean * moving_mean
    fixed_variance = (box_mean(fixed * fixed, window) - fixed_mean**2).clamp_min(0)
    moving_variance = (box_mean(moving * moving, window) - moving_mean**2).clamp_min(0)
    scale = (fixed_variance + VARIANCE_FLOOR) * (moving_variance + VARIANCE_FLOOR)
    return covariance / torch.sqrt(scale)


def diffusion(displacement: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared gradient of (B, 2, h, w) control-grid offsets.

    Offsets are in normalised coordinates (2 units per image side) and
    neighbours are 2/h or 2/w apart, so the gradient is dimensionless strain:
    the same penalty whatever the level's size.
    """
    height, width = displacement.shape[-2:]
    along_y = (displacement[:, :, 1:, :] - displacement[:, :, :-1, :]) * (height / 2)
    along_x = (displacement[:, :, :, 1:] - displacement[:, :, :, :-1]) * (width / 2)
    strain = along_y.pow(2).flatten(1).mean(dim=1)
    return strain + along_x.pow(2).flatten(1).mean(dim=1)


def normalise_locally(images: torch.Tensor, window: int) -> torch.Tensor:
    """(N, 1, H, W) images with zero local mean and unit local deviation.

    The mean and deviation come from a ``window`` x ``window`` box around each
    pixel; the variance floor keeps flat regions near 0 instead of amplifying
    their noise. The squared difference of two such images is a cheap stand-in
    for local NCC: its statistics are computed once per image, not per step.
    """
    mean = box_mean(images, window)
    variance = (box_mean(images * images, window) - mean**2).clamp_min(0)
    return (images - mean) / torch.sqrt(variance + VARIANCE_FLOOR)


# ---------------------------------------------------------------------------
# What registration reads from each image


def resize(images: torch.Tensor, size: Size) -> torch.Tensor:
    """(N, C, H, W) images resized to ``size``, antialiased when shrinking."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(
        images, size=size, mode="bilinear", align_corners=False, antialias=True
    )


def edge_strength(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) gradient magnitude by central differences (intensity/pixel).

    Edges rather than intensities drive the affine stage: in ultrasound the
    bright skull or bone outlines say where a structure is, while the
    brightness of the surrounding tissue varies from image to image.
    """
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    along_x = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    along_y = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    return torch.sqrt(along_x**2 + along_y**2)


def edges_key(size: Size) -> str:
    """The name of the edge map at ``size`` among :func:`registration_inputs`."""
    return f"registration_edges_{size[0]}x{size[1]}"


def normalised_key(size: Size, window: int) -> str:
    """The name of the image normalised over ``window`` at ``size``."""
    return f"registration_normalised{window}_{size[0]}x{size[1]}"


def registration_input_names(options: RegistrationOptions) -> list[str]:
    """The keys of :func:`registration_inputs` under ``options``.

    Each name holds every setting its array depends on, so inputs computed
    under other options are never mistaken for these.
    """
    return [edges_key(size) for size in options.affine_levels] + [
        normalised_key(size, options.window) for size in options.deformable_levels
    ]


def registration_inputs(
    images: torch.Tensor, options: RegistrationOptions
) -> dict[str, torch.Tensor]:
    """What :func:`register` reads from (N, 1, H, W) images in [0, 1].

    They depend on one image each, so a caller that registers the same image
    many times computes them once.

    Returns:
        name -> (N, 1, h, w) array: the gradient magnitude at each affine level
        (:func:`edges_key`), and the image with zero local mean and unit local
        deviation at each deformable level (:func:`normalised_key`).
    """
    inputs = {}
    for size in options.affine_levels:
        inputs[edges_key(size)] = edge_strength(resize(images, size))
    for size in options.deformable_levels:
        normalised = normalise_locally(resize(images, size), options.window)
        inputs[normalised_key(size, options.window)] = normalised
    return inputs


# ---------------------------------------------------------------------------
# Optimisation


def register(
    fixed: Mapping[str, torch.Tensor],
    moving: Mapping[str, torch.Tensor],
    options: RegistrationOptions,
) -> Transform:
    """Register B moving images to B fixed images: affine, then deformable.

    Args:
        fixed: :func:`registration_inputs` of the B fixed images.
        moving: the same for the B moving images.
        options: levels, steps and weights.

    Returns:
        The transforms that map each fixed pixel into its moving image.
    """
    batch = next(iter(fixed.values())).shape[0]
    if batch == 0:
        return identity(0)

    with torch.enable_grad():
        affine = optimise_affine(fixed, moving, options)
        if not options.deformable_levels:
            return Transform(affine=affine)
        displacement = optimise_displacement(fixed, moving, affine, options)
    return Transform(affine=affine, displacement=displacement)


def optimise_affine(
    fixed: Mapping[str, torch.Tensor],
    moving: Mapping[str, torch.Tensor],
    options: RegistrationOptions,
) -> torch.Tensor:
    """(B, 2, 3) affine maps that maximise the global NCC of the edge maps.

    Starts from the identity and refines coarse to fine; the coarse level's
    blur widens the basin of attraction.
    """
    # Limitation: the search starts at the identity and only descends, so a
    # structure shifted by more than about a fifth of the image, or scaled by
    # more than about 1.5 times, is not found: the mask lands where the
    # nearest edge match is (polyps in colonoscopy). Retrieval of similar
    # supports keeps most pairs within reach.
    batch = next(iter(fixed.values())).shape[0]
    affine = identity(batch).affine
    for size in options.affine_levels:
        key = edges_key(size)

        def loss(affine: torch.Tensor, key: str = key) -> torch.Tensor:
            warped = warp(moving[key], Transform(affine=affine))
            return 1 - global_ncc(fixed[key], warped)

        affine = descend(
            affine,
            loss,
            steps=options.affine_steps,
            learning_rate=options.affine_learning_rate,
        )
    return affine


def optimise_displacement(
    fixed: Mapping[str, torch.Tensor],
    moving: Mapping[str, torch.Tensor],
    affine: torch.Tensor,
    options: RegistrationOptions,
) -> torch.Tensor:
    """(B, 2, h, w) control-grid offsets applied after ``affine``.

    Minimises the squared difference of the locally normalised images, a
    stand-in for local NCC whose statistics need no recomputing per step,
    plus ``smoothness`` times the diffusion of the field. The control grid
    refines with each level.
    """
    batch = affine.shape[0]
    displacement = None
    for size in options.deformable_levels:
        key = normalised_key(size, options.window)
        grid_size = tuple(max(2, side // options.control_spacing) for side in size)
        if displacement is None:
            displacement = torch.zeros((batch, 2, *grid_size))
        else:
            displacement = F.interpolate(
                displacement, size=grid_size, mode="bilinear", align_corners=False
            )

        # Per control point, the gradient of a mean over pixels shrinks with
        # the number of control points; scaling by it keeps the gradient
        # about the size of the local mismatch on every level.
        control_points = grid_size[0] * grid_size[1]

        def loss(
            displacement: torch.Tensor, key: str = key, scale: int = control_points
        ) -> torch.Tensor:
            warped = warp(moving[key], Transform(affine, displacement))
            mismatch = (fixed[key] - warped).pow(2).flatten(1).mean(dim=1)
            return scale * (mismatch + options.smoothness * diffusion(displacement))

        # Limitation: nothing keeps the field invertible; with little
        # smoothness it can fold over, which smears the warped mask.

        displacement = descend(
            displacement,
            loss,
            steps=options.deformable_steps,
            learning_rate=options.deformable_learning_rate,
        )
    return displacement


def descend(
    start: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int,
    learning_rate: float,
) -> torch.Tensor:
    """Minimise every pair's ``loss`` from ``start`` by Adam; the result.

    Args:
        start: (B, ...) parameters, one slice per pair.
        loss: parameters -> (B,) loss per pair.
        steps: Adam steps.
        learning_rate: the first step's size; it falls linearly to 0.
    """
    parameters = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([parameters], lr=learning_rate, eps=GRADIENT_FLOOR)
    for step in range(steps):
        # Adam's steps stay near the learning rate even at the optimum, so
        # a constant rate would leave the result jittering by that much; a
        # rate falling to 0 settles (an image registered to itself stays put).
        optimizer.param_groups[0]["lr"] = learning_rate * (1 - step / steps)
        optimizer.zero_grad(set_to_none=True)
        loss(parameters).sum().backward()
        optimizer.step()
    return parameters.detach()
