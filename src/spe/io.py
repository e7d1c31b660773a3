"""Reading images, masks and folders of cases, with spacing, failing clearly.

Axis order: every array is returned in NumPy (row-major) order. A 2-D image is
(H, W), or (H, W, C) for colour; a 3-D volume is (Z, Y, X), the reverse of the
(x, y, z) order that NIfTI, MetaImage and NRRD headers (and SimpleITK's
``GetSpacing``) use. Spacing is always given in the array's axis order, in
millimetres for medical formats and 1.0 for photographic formats unless the
user overrides it. Orientation (direction cosines) is not applied: images and
masks are compared voxel by voxel as stored, which is how segmentation tools
write their predictions.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, UnidentifiedImageError

from spe.errors import SPEError

logger = logging.getLogger(__name__)

PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MEDICAL_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
IMAGE_EXTENSIONS = MEDICAL_EXTENSIONS + PHOTO_EXTENSIONS

# nnU-Net names the channels of an image case_0000, case_0001, ...
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class LoadedImage:
    """An image or mask as read from disk.

    Attributes:
        array: (H, W), (H, W, C) or (Z, Y, X) array, dtype as stored (masks:
            an integer label map).
        spacing: size of a pixel or voxel along each spatial axis of ``array``,
            same order, in mm (1.0 where the file has no spacing).
        path: the file it came from.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    path: Path

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The shape without a trailing colour axis."""
        return tuple(self.array.shape[: len(self.spacing)])


# ---------------------------------------------------------------------------
# File names


def split_extension(path: Path | str) -> tuple[str, str]:
    """(stem, extension) with double extensions such as ``.nii.gz`` kept whole."""
    name = Path(path).name
    lower = name.lower()
    for extension in IMAGE_EXTENSIONS:
        if lower.endswith(extension):
            return name[: -len(extension)], lower[-len(extension) :]
    suffix = Path(name).suffix
    return name[: len(name) - len(suffix)], suffix.lower()


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a file in a format this package reads."""
    return path.is_file() and split_extension(path)[1] in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------
# Single files


def _read_photo(path: Path) -> np.ndarray:
    """PNG, JPEG, BMP or TIFF -> (H, W) or (H, W, C) array as stored."""
    with Image.open(path) as image:
        image.load()
        mode = image.mode
        bits = getattr(image, "tag_v2", {}).get(258, (8,))
        if mode in ("RGB", "RGBA") and max(np.atleast_1d(bits)) > 8:
            # Pillow would truncate 16-bit colour TIFF to 8 bits.
            raise NotImplementedError("16-bit colour TIFF")
        if mode == "P":
            # A palette image keeps its indices: for masks they are the labels.
            return np.asarray(image)
        if mode in ("1", "L", "I;16", "I;16B", "I;16L", "I", "F", "RGB", "RGBA"):
            return np.asarray(image)
        if mode == "LA":
            return np.asarray(image)[..., 0]
        return np.asarray(image.convert("RGB"))


def _read_medical(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """NIfTI, MetaImage or NRRD -> (array in (Z, Y, X) order, spacing in mm)."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    if image.GetNumberOfComponentsPerPixel() > 1 and array.ndim == len(spacing):
        array = array[..., None]

    # A 2-D image saved as a one-slice volume (nnU-Net does this) is 2-D here.
    while len(spacing) > 2 and array.shape[0] == 1:
        array = array[0]
        spacing = spacing[1:]
    return array, spacing


def _read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Read any supported file; spacing is None for photographic formats."""
    if not path.exists():
        raise SPEError(f"{path}: no such file; check the path")
    extension = split_extension(path)[1]
    if extension not in IMAGE_EXTENSIONS:
        message = (
            f"{path}: unsupported file type {extension or '(none)'!r}; "
            f"use one of {', '.join(IMAGE_EXTENSIONS)}"
        )
        raise SPEError(message)

    try:
        if extension in PHOTO_EXTENSIONS:
            try:
                return _read_photo(path), None
            except (UnidentifiedImageError, ValueError, NotImplementedError):
                if extension not in (".tif", ".tiff"):
                    raise
                # Pillow lacks some TIFF layouts (16-bit colour); ITK reads them.
                return _read_medical(path)[0], None
        return _read_medical(path)
    except SPEError:
        raise
    except (OSError, RuntimeError, ValueError, UnidentifiedImageError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = reason[:160] or type(error).__name__
        message = (
            f"{path}: cannot read this file ({reason}); it may be truncated or "
            f"not a {extension} image, so re-export it"
        )
        raise SPEError(message) from error


# Spacing outside this range (mm) is a typo or a unit error, and squares of
# it would overflow distance computations.
SPACING_RANGE_MM = (1e-6, 1e6)


def check_spacing(spacing: Sequence[float], what: str) -> tuple[float, ...]:
    """Spacing as floats, each finite and within :data:`SPACING_RANGE_MM`.

    Args:
        what: names the source in the error, e.g. "--spacing" or a file.
    """
    values = tuple(float(s) for s in spacing)
    low, high = SPACING_RANGE_MM
    if not values or any(not np.isfinite(v) or not low <= v <= high for v in values):
        message = (
            f"{what}: spacing {values} must be positive numbers in mm between "
            f"{low:g} and {high:g}"
        )
        raise SPEError(message)
    return values


def _spacing_for(
    path: Path,
    header_spacing: tuple[float, ...] | None,
    n_spatial: int,
    override: Sequence[float] | None,
) -> tuple[float, ...]:
    """The spacing to use: the override, else the header, else 1.0 per axis."""
    if override is not None:
        override = check_spacing(override, str(path))
        if len(override) != n_spatial:
            message = (
                f"{path}: spacing {override} has {len(override)} values but the "
                f"image has {n_spatial} spatial axes; give one value per axis"
            )
            raise SPEError(message)
        return override
    if header_spacing is not None:
        return check_spacing(header_spacing, f"{path} (header)")
    return (1.0,) * n_spatial


def _spatial_axes(array: np.ndarray, header_spacing: tuple[float, ...] | None) -> int:
    """How many axes of ``array`` are spatial (the rest is colour)."""
    if header_spacing is not None:
        return len(header_spacing)
    return 2


def read_image(
    path: Path | str, *, spacing: Sequence[float] | None = None, kind: str = "image"
) -> LoadedImage:
    """Read an image: (H, W), (H, W, C) colour, or a (Z, Y, X) volume.

    Args:
        path: a PNG, JPEG, BMP, TIFF, NIfTI, MetaImage or NRRD file.
        spacing: overrides the spacing (mm, array axis order).

    Raises:
        SPEError: the file is missing, unreadable, not 2-D or 3-D, or holds
            NaN or infinity.
    """
    path = Path(path)
    array, header_spacing = _read_array(path)
    if array.ndim < 2 or array.size == 0:
        raise SPEError(f"{path}: holds no 2-D or 3-D {kind} (shape {array.shape})")
    if header_spacing is not None and len(header_spacing) > 3:
        message = (
            f"{path}: a {len(header_spacing)}-D {kind} (shape {array.shape}); SPE "
            f"reads 2-D and 3-D, so save each time point or channel separately"
        )
        raise SPEError(message)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        message = (
            f"{path}: the {kind} holds NaN or infinite values; replace them "
            f"(for example with the background value) and save it again"
        )
        raise SPEError(message)
    if array.dtype == bool:
        array = array.astype(np.uint8)

    n_spatial = _spatial_axes(array, header_spacing)
    return LoadedImage(
        array=array,
        spacing=_spacing_for(path, header_spacing, n_spatial, spacing),
        path=path,
    )


def read_mask(
    path: Path | str, *, spacing: Sequence[float] | None = None
) -> LoadedImage:
    """Read a mask or label map as a non-negative integer array.

    Binary masks may be stored 0/1 or 0/255; label maps store the class index.
    A colour file whose channels are equal is read as gray.

    Raises:
        SPEError: the file is unreadable, is a colour image with unequal
            channels, or holds negative or fractional values.
    """
    image = read_image(path, spacing=spacing, kind="mask")
    if split_extension(image.path)[1] in (".jpg", ".jpeg"):
        message = (
            f"{image.path}: a mask saved as JPEG, whose compression changes label "
            f"values; save masks losslessly (PNG, NIfTI, MetaImage, NRRD)"
        )
        raise SPEError(message)
    array = image.array
    if array.ndim == len(image.spacing) + 1:
        channels = array[..., :3] if array.shape[-1] in (3, 4) else array
        if not (channels == channels[..., :1]).all():
            message = (
                f"{image.path}: a colour mask with unequal channels; save masks as "
                f"single-channel label images (0 = background, 1..K = classes)"
            )
            raise SPEError(message)
        array = channels[..., 0]

    if np.issubdtype(array.dtype, np.floating):
        if np.abs(array).max() >= 2**31:
            message = (
                f"{image.path}: the mask holds values up to {np.abs(array).max():.3g}; "
                f"labels must be small non-negative integers"
            )
            raise SPEError(message)
        if not np.array_equal(array, np.round(array)):
            message = (
                f"{image.path}: the mask holds fractional values (probabilities?); "
                f"threshold it into a label image first"
            )
            raise SPEError(message)
        array = array.astype(np.int32)
    if array.min() < 0:
        message = (
            f"{image.path}: the mask holds negative values (min {array.min()}); "
            f"labels must be 0 (background) or positive class indices"
        )
        raise SPEError(message)
    return LoadedImage(array=array, spacing=image.spacing, path=image.path)


def read_spacing_table(path: Path | str) -> dict[str, tuple[float, ...]]:
    """Per-case spacing from a CSV with a ``case_id`` column and spacing columns.

    One numeric column (such as ``pixel_size_mm``) means the same spacing on
    every axis; several columns give the spacing per axis in array order.

    Returns:
        case id -> spacing in mm; a 1-tuple means isotropic.
    """
    path = Path(path)
    try:
        # utf-8-sig also reads the byte-order mark spreadsheet programs write.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        message = (
            f"{path}: cannot read the spacing table ({error}); save it as UTF-8 CSV"
        )
        raise SPEError(message) from error
    if not rows or "case_id" not in rows[0]:
        raise SPEError(f"{path}: a spacing table needs a header with a case_id column")

    table = {}
    columns = [name for name in rows[0] if name != "case_id"]
    for line, row in enumerate(rows, start=2):
        try:
            values = tuple(float(row[name]) for name in columns)
        except (TypeError, ValueError) as error:
            message = f"{path}:{line}: spacing values must be numbers, got {row}"
            raise SPEError(message) from error
        values = check_spacing(values, f"{path}:{line}")
        case_id = normalize_case_id(row["case_id"])
        if case_id in table:
            message = f"{path}:{line}: case {case_id!r} appears twice; keep one row"
            raise SPEError(message)
        table[case_id] = values
    return table


def expand_spacing(
    spacing: tuple[float, ...], n_spatial: int, *, what: str = "spacing"
) -> tuple[float, ...]:
    """A spacing of 1 value (isotropic) or ``n_spatial`` values, as n values."""
    if len(spacing) == 1:
        return spacing * n_spatial
    if len(spacing) != n_spatial:
        message = (
            f"{what}: spacing {spacing} has {len(spacing)} values for an image with "
            f"{n_spatial} axes; give 1 value or {n_spatial}"
        )
        raise SPEError(message)
    return spacing


# ---------------------------------------------------------------------------
# Folders of cases


def normalize_case_id(name: str) -> str:
    """Unicode NFC form, so the same name typed on macOS and Linux matches."""
    return unicodedata.normalize("NFC", name)


def list_cases(folder: Path | str) -> dict[str, Path]:
    """Case id -> file for every image file in ``folder`` (not recursive).

    The case id is the file name without its extension. Hidden files (such
    as macOS ``._name`` and ``.DS_Store``) are skipped; anything else that
    looks like an image but is not a readable file is named in a warning.

    Raises:
        SPEError: the folder is missing, holds no image files, or two files
            give the same case id.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SPEError(f"{folder}: no such folder; check the path")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if is_image_file(p)]
    unusable = [
        p.name
        for p in entries
        if not p.is_file() and split_extension(p)[1] in IMAGE_EXTENSIONS
    ]
    if unusable:
        logger.warning(
            "%s: skipping %d entries named like images that are not files (folders "
            "or broken links): %s",
            folder,
            len(unusable),
            describe_names(unusable),
        )
    if not files:
        message = (
            f"{folder}: holds no image files; expected one of "
            f"{', '.join(IMAGE_EXTENSIONS)}"
        )
        inner = [name for name in ("images", "labels") if (folder / name).is_dir()]
        if inner:
            message += f" (did you mean {folder / inner[-1]}?)"
        raise SPEError(message)

    cases: dict[str, Path] = {}
    for path in files:
        case_id = normalize_case_id(split_extension(path)[0])
        if case_id in cases:
            message = (
                f"{folder}: {cases[case_id].name} and {path.name} are both case "
                f"{case_id!r}; keep one file per case"
            )
            raise SPEError(message)
        cases[case_id] = path
    return cases


def strip_channels(cases: dict[str, Path], folder: Path | str) -> dict[str, Path]:
    """nnU-Net image names (``case_0000``) -> case ids; channel 0000 is used.

    Further channels (``case_0001``...) are left out, and a warning names
    them.
    """
    stripped: dict[str, Path] = {}
    extra_channels = []
    for case_id, path in cases.items():
        match = CHANNEL_SUFFIX.match(case_id)
        if match is None:
            stripped[case_id] = path
        elif match["channel"] == "0000":
            stripped[match["case"]] = path
        else:
            extra_channels.append(path.name)
    if extra_channels:
        logger.warning(
            "%s: using channel _0000 only; ignoring %d other channel files (%s)",
            folder,
            len(extra_channels),
            describe_names(extra_channels),
        )
    return stripped


def list_image_cases(
    folder: Path | str, matching: Iterable[str] | None = None
) -> dict[str, Path]:
    """Image files by case id, reading nnU-Net's ``_0000`` suffix when it applies.

    Names such as ``scan_0003`` are ambiguous: a case of its own, or channel 3
    of ``scan``. The suffix is read as a channel only when that makes the
    images match ``matching`` (the case ids of the labels or predictions)
    better than the plain names do; without ``matching``, only when every
    image name ends in ``_0000``.
    """
    return read_channel_suffix(list_cases(folder), folder, matching)


def read_channel_suffix(
    plain: dict[str, Path], folder: Path | str, matching: Iterable[str] | None
) -> dict[str, Path]:
    """:func:`list_image_cases` on an already listed folder (``plain``)."""
    if not any(CHANNEL_SUFFIX.match(case_id) for case_id in plain):
        return plain
    if matching is None:
        if all(case_id.endswith("_0000") for case_id in plain):
            return strip_channels(plain, folder)
        return plain
    wanted = set(matching)
    stripped = strip_channels(plain, folder)
    if len(wanted & set(stripped)) > len(wanted & set(plain)):
        return stripped
    return plain


# Suffixes that tools add to mask file names: MONAI's SaveImage appends its
# output_postfix (case_seg.nii.gz with the "seg" of its tutorials); other
# pipelines write case_label, case_mask or case_pred.
MASK_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_pred")


def list_mask_cases(
    folder: Path | str, matching: Iterable[str] | None = None
) -> dict[str, Path]:
    """Mask files by case id, reading a tool's suffix (``case_seg``) when it applies.

    A suffix from :data:`MASK_SUFFIXES` that every mask name ends with is
    dropped only when that makes the masks match ``matching`` (the case ids
    of the images or of the other masks) better than the plain names do, so
    a case genuinely named ``liver_seg`` keeps its name.
    """
    return read_mask_suffix(list_cases(folder), matching)


def read_mask_suffix(
    plain: dict[str, Path], matching: Iterable[str] | None
) -> dict[str, Path]:
    """:func:`list_mask_cases` on an already listed folder (``plain``)."""
    if matching is None:
        return plain
    wanted = set(matching)
    best, best_overlap = plain, len(wanted & set(plain))
    for suffix in MASK_SUFFIXES:
        if not all(case_id.endswith(suffix) for case_id in plain):
            continue
        # A suffix every name ends with: stripping it keeps the ids distinct.
        stripped = {case_id[: -len(suffix)]: path for case_id, path in plain.items()}
        overlap = len(wanted & set(stripped))
        if overlap > best_overlap:
            best, best_overlap = stripped, overlap
    return best


def describe_names(names: Iterable[str], *, limit: int = 5) -> str:
    """'a, b, c and 7 more': a short list of names for a one-line message."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f" and {len(names) - limit} more"
    return shown


def match_cases(
    first: dict[str, Path],
    second: dict[str, Path],
    *,
    first_name: str,
    second_name: str,
) -> list[str]:
    """The case ids in both collections, sorted; any unmatched id is an error.

    Raises:
        SPEError: naming the cases found in one collection but not the other.
    """
    only_first = set(first) - set(second)
    only_second = set(second) - set(first)
    if only_first or only_second:
        parts = []
        if only_first:
            parts.append(
                f"{len(only_first)} case(s) in {first_name} have no match in "
                f"{second_name}: {describe_names(only_first)}"
            )
        if only_second:
            parts.append(
                f"{len(only_second)} case(s) in {second_name} have no match in "
                f"{first_name}: {describe_names(only_second)}"
            )
        message = "; ".join(parts) + "; case ids are file names without extension"
        raise SPEError(message)
    return sorted(first)


@dataclass(frozen=True)
class LabeledFolder:
    """A folder with ``images/`` and ``labels/`` whose cases match one to one."""

    root: Path
    case_ids: list[str]
    images: dict[str, Path]
    labels: dict[str, Path]


def open_labeled_folder(
    root: Path | str, *, labels_name: str = "labels"
) -> LabeledFolder:
    """Pair ``root/images`` with ``root/labels`` (or another labels folder)."""
    root = Path(root)
    if not root.is_dir():
        raise SPEError(f"{root}: no such folder; check the path")
    # Settle the mask suffix against the plain image names, then the channel
    # suffix against the labels' case ids.
    image_files = list_cases(root / "images")
    labels = read_mask_suffix(
        list_cases(root / labels_name),
        read_channel_suffix(image_files, root / "images", None),
    )
    images = read_channel_suffix(image_files, root / "images", labels)
    case_ids = match_cases(
        images,
        labels,
        first_name=str(root / "images"),
        second_name=str(root / labels_name),
    )
    return LabeledFolder(root=root, case_ids=case_ids, images=images, labels=labels)


def check_same_shape(
    mask: LoadedImage, other: LoadedImage, *, what: str = "its ground truth"
) -> None:
    """Raise SPEError unless two arrays have the same spatial shape."""
    if mask.spatial_shape != other.spatial_shape:
        message = (
            f"{mask.path}: shape {mask.spatial_shape} differs from {what} "
            f"{other.path} {other.spatial_shape}; resample it to the same grid"
        )
        raise SPEError(message)


def encode_mask(mask: np.ndarray, spacing: Sequence[float], extension: str) -> bytes:
    """A label map as the bytes of a PNG (2-D) or a NIfTI file (2-D or 3-D).

    Args:
        mask: (H, W) or (Z, Y, X) integer labels, 0 background, at most 65535.
        spacing: size per axis in array order (mm); written into NIfTI headers,
            and dropped by PNG, which has no spacing.
        extension: ".png" or ".nii.gz".

    Returns:
        The file's bytes, which :func:`read_mask` reads back unchanged.
    """
    if mask.size and (mask.min() < 0 or mask.max() > np.iinfo(np.uint16).max):
        raise SPEError("a mask to save has labels outside 0..65535")
    dtype = np.uint8 if mask.size == 0 or mask.max() <= 255 else np.uint16
    labels = np.ascontiguousarray(mask, dtype=dtype)
    if extension == ".png":
        if labels.ndim != 2:
            raise SPEError(f"PNG holds 2-D masks; a {labels.ndim}-D mask needs .nii.gz")
        buffer = io.BytesIO()
        Image.fromarray(labels).save(buffer, format="PNG")
        return buffer.getvalue()
    if extension != ".nii.gz":
        raise SPEError(f"masks are saved as .png or .nii.gz, not {extension!r}")

    # SimpleITK writes to a path only: a private temporary folder holds it.
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing([float(s) for s in reversed(tuple(spacing))])
    with tempfile.TemporaryDirectory(prefix="spe-mask-") as folder:
        path = Path(folder) / f"mask{extension}"
        sitk.WriteImage(image, str(path), useCompression=True)
        return path.read_bytes()
