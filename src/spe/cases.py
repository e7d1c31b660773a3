"""Sets of cases in memory: images, masks and spacing, checked against each other.

A *case* is one 2-D image or 3-D volume with its spacing and, when known, a
mask (ground truth or a model's prediction). The pipeline reads whole folders
once into :class:`CaseSet` objects and hands arrays to the steps after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from spe import io
from spe.errors import SPEError
from spe.metrics import binarize, is_binary_task, labels_seen, task_classes

logger = logging.getLogger(__name__)


@dataclass
class Case:
    """One image with its spacing and, when known, a mask.

    Attributes:
        case_id: the file name without extension.
        image: (H, W), (H, W, C) or (Z, Y, X) array as stored.
        spacing: pixel or voxel size per spatial axis, array order (mm).
        mask: integer label map of the image's spatial shape, or None.
    """

    case_id: str
    image: np.ndarray
    spacing: tuple[float, ...]
    mask: np.ndarray | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[: len(self.spacing)])

    @property
    def is_volume(self) -> bool:
        return len(self.spacing) == 3


@dataclass
class CaseSet:
    """Cases in case-id order, with where they came from."""

    cases: list[Case]
    source: str
    fingerprint: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    labels_name: str = ""

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]

    @property
    def is_volume(self) -> bool:
        return bool(self.cases) and self.cases[0].is_volume

    def with_masks(self, masks: dict[str, np.ndarray], source: str) -> CaseSet:
        """The same images with other masks (a model's predictions)."""
        cases = [
            Case(case.case_id, case.image, case.spacing, masks[case.case_id])
            for case in self.cases
        ]
        return CaseSet(cases=cases, source=source)


def resolve_task(
    truth_sets: Sequence[CaseSet], classes: Sequence[int] | None = None
) -> tuple[list[int], bool]:
    """The classes of a task, from ground truth; binary masks become 0/1.

    Masks whose nonzero values are one number (or 1 and 255, from mixed 0/1
    and 0/255 files) are a binary task: class 1. Their masks are rewritten
    as 0/1 in place, so every later step compares label k with label k.

    Args:
        truth_sets: case sets whose masks are ground truth, from one task.
        classes: the classes asked for, or None for all found.

    Returns:
        (classes, whether the task is binary).

    Raises:
        SPEError: a class asked for is not in the labels, or the labels hold
            so many values that they look like intensity images.
    """
    classes, binary = task_classes(
        [case.mask for cases in truth_sets for case in cases.cases],
        classes,
        source=", ".join(cases.source for cases in truth_sets),
    )
    if binary:
        for cases in truth_sets:
            for case in cases.cases:
                case.mask = binarize(case.mask)
    return classes, binary


def with_binary_masks(
    cases: CaseSet, binary: bool, *, allowed: Sequence[int] | None = None
) -> CaseSet:
    """A model's predictions checked against the task, as the task stores masks.

    For a binary task the masks become 0/1 (``value > 0``); a prediction with
    several labels is an error, since it belongs to another task. For a task
    with several classes, labels outside ``allowed`` (the labels of the
    ground truth) are an error.

    Raises:
        SPEError: naming the case, its labels and the task's.
    """
    for case in cases.cases:
        if case.mask is None:
            continue
        labels = labels_seen([case.mask])
        if binary and not is_binary_task(labels):
            message = (
                f"{cases.source}: the prediction of case {case.case_id!r} holds labels "
                f"{sorted(labels)} but the task is binary (one foreground label); "
                f"give predictions of the calibrated task"
            )
            raise SPEError(message)
        if not binary and allowed is not None and not labels <= set(allowed):
            message = (
                f"{cases.source}: the prediction of case {case.case_id!r} holds labels "
                f"{sorted(labels - set(allowed))} that the ground truth never uses "
                f"(it has {sorted(allowed)}); check the label values"
            )
            raise SPEError(message)
    if not binary:
        return cases
    return CaseSet(
        cases=[
            Case(
                c.case_id,
                c.image,
                c.spacing,
                None if c.mask is None else binarize(c.mask),
            )
            for c in cases.cases
        ],
        source=cases.source,
        fingerprint=cases.fingerprint,
        files=cases.files,
    )


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint_files(files: Sequence[tuple[str, Path]]) -> str:
    """A short hash of case ids and file contents: the identity of a data set."""
    digest = hashlib.sha256()
    for case_id, path in sorted(files):
        digest.update(case_id.encode("utf-8"))
        digest.update(_file_digest(path).encode("ascii"))
    return digest.hexdigest()[:16]


def _check_dimensions(cases: Sequence[Case], source: str) -> None:
    """All 2-D or all 3-D: a mixed folder is almost always a mistake."""
    kinds = {len(case.spacing) for case in cases}
    if len(kinds) > 1:
        message = (
            f"{source}: mixes 2-D images and 3-D volumes; keep one kind per folder"
        )
        raise SPEError(message)


def load_labeled(
    root: Path | str,
    *,
    labels_name: str = "labels",
    spacing_table: dict[str, tuple[float, ...]] | None = None,
    progress: bool = False,
) -> CaseSet:
    """Read ``root/images`` and ``root/labels`` into memory, matched by case id.

    Raises:
        SPEError: unmatched cases, unreadable files, or a label whose shape
            differs from its image.
    """
    folder = io.open_labeled_folder(root, labels_name=labels_name)
    cases = []
    for case_id in tqdm(
        folder.case_ids,
        desc=f"reading {Path(root).name}",
        disable=not progress,
        leave=False,
    ):
        spacing = _table_spacing(spacing_table, case_id)
        image = _read_image_with_spacing(folder.images[case_id], spacing)
        label = io.read_mask(folder.labels[case_id], spacing=image.spacing)
        io.check_same_shape(label, image, what="its image")
        cases.append(Case(case_id, image.array, image.spacing, label.array))
    _check_dimensions(cases, str(root))

    files = [(i, folder.images[i]) for i in folder.case_ids]
    files += [(f"{i}/label", folder.labels[i]) for i in folder.case_ids]
    return CaseSet(
        cases=cases,
        source=str(root),
        fingerprint=fingerprint_files(files),
        files=dict(folder.images),
        labels_name=labels_name,
    )


def load_images(
    folder: Path | str,
    *,
    matching: Path | str | None = None,
    spacing_table: dict[str, tuple[float, ...]] | None = None,
    progress: bool = False,
) -> CaseSet:
    """Read a folder of images (no masks) into memory.

    Args:
        matching: the folder of masks these images go with (the model's
            predictions), which settles how nnU-Net channel suffixes are read.
    """
    listed = io.list_cases(folder)
    files = io.read_channel_suffix(listed, folder, None)
    if matching is not None:
        # Settle the mask suffix against the plain image names, then the
        # channel suffix against the masks' case ids.
        others = io.list_mask_cases(matching, matching=files)
        files = io.read_channel_suffix(listed, folder, others)
    cases = []
    for case_id, path in tqdm(
        files.items(),
        desc=f"reading {Path(folder).name}",
        disable=not progress,
        leave=False,
    ):
        image = _read_image_with_spacing(path, _table_spacing(spacing_table, case_id))
        cases.append(Case(case_id, image.array, image.spacing))
    _check_dimensions(cases, str(folder))
    return CaseSet(cases=cases, source=str(folder), files=files)


def read_predictions(folder: Path | str, images: CaseSet) -> dict[str, np.ndarray]:
    """A model's predicted masks for every case of ``images``, shape-checked.

    Raises:
        SPEError: a case without a prediction (or a prediction without an
            image), or a prediction whose shape differs from its image.
    """
    files = io.list_mask_cases(folder, matching=images.case_ids)
    io.match_cases(
        {case.case_id: Path(case.case_id) for case in images.cases},
        files,
        first_name=images.source,
        second_name=str(folder),
    )
    masks = {}
    for case in images.cases:
        prediction = io.read_mask(files[case.case_id])
        if prediction.spatial_shape != case.spatial_shape:
            message = (
                f"{prediction.path}: shape {prediction.spatial_shape} differs from "
                f"its image's {case.spatial_shape}; predict at the image's size"
            )
            raise SPEError(message)
        masks[case.case_id] = prediction.array
    return masks


def _table_spacing(
    table: dict[str, tuple[float, ...]] | None, case_id: str
) -> tuple[float, ...] | None:
    if table is None:
        return None
    if case_id not in table:
        raise SPEError(f"case {case_id!r} has no row in the spacing table; add one")
    return table[case_id]


def _read_image_with_spacing(
    path: Path, spacing: tuple[float, ...] | None
) -> io.LoadedImage:
    image = io.read_image(path)
    if spacing is None:
        return image
    return dataclasses.replace(
        image, spacing=io.expand_spacing(spacing, len(image.spacing))
    )
