"""3-D volumes with spacing, and label maps with several classes, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from spe.calibration import Calibration
from spe.cli import main


def write_volume(path, array, spacing_zyx):
    volume = sitk.GetImageFromArray(array)
    volume.SetSpacing(tuple(reversed(spacing_zyx)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume, str(path))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory, datasets):
    """Two reference, two calibration and two target volumes (44 slices of
    about 70 x 90), given anisotropic spacing so the slice axis is the first."""
    root = tmp_path_factory.mktemp("volumes")
    spacing = (2.5, 1.25, 1.25)
    splits = {"reference": "train", "calibration": "test", "target": "extra_test"}
    for name, split in splits.items():
        folder = datasets / "la3d" / split
        for path in sorted((folder / "images").iterdir())[:2]:
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            label = sitk.GetArrayFromImage(
                sitk.ReadImage(str(folder / "labels" / path.name))
            )
            write_volume(root / name / "images" / path.name, image, spacing)
            write_volume(root / name / "labels" / path.name, label, spacing)
    for shift in (0, 3, 6, 10):
        for name in ("calibration", "target"):
            for path in (root / name / "labels").iterdir():
                label = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
                destination = root / f"{name}_models" / f"shift{shift}" / path.name
                write_volume(destination, np.roll(label, shift, axis=2), spacing)
    return root


def test_volumes_calibrate_and_estimate(volumes, capsys):
    calibration = volumes / "calibration.json"
    code = main(
        [
            "calibrate",
            "--reference",
            str(volumes / "reference"),
            "--calibration",
            str(volumes / "calibration"),
            "--predictions",
            str(volumes / "calibration_models"),
            "--out",
            str(calibration),
            "--segmenter",
            "patch",
            "-q",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(calibration.read_text())
    assert data["per_image"] is None  # per-image estimates are for 2-D images
    assert data["dataset_level"]["1"]["dice"]["slope"] > 0
    # HD95 is measured in mm with the volume's spacing: a shift of 10 voxels
    # along x (1.25 mm) moves the boundary by 12.5 mm.
    hd95_points = data["points"]["1"]["hd95"]
    worst_real = max(real for _, real, _ in hd95_points)
    assert worst_real == pytest.approx(12.5, abs=1.5)

    estimates = {}
    for shift in (0, 10):
        code = main(
            [
                "estimate",
                "--calibration",
                str(calibration),
                "--reference",
                str(volumes / "reference"),
                "--images",
                str(volumes / "target" / "images"),
                "--predictions",
                str(volumes / "target_models" / f"shift{shift}"),
                "--out",
                str(volumes / f"estimate{shift}"),
                "--json",
                "-q",
            ]
        )
        captured = capsys.readouterr()
        assert code == 0, captured.err
        estimates[shift] = json.loads(captured.out)["estimates"]["1"]["dice"][
            "estimate"
        ]
    assert estimates[0] > estimates[10] + 0.1


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_multiclass_calibration(tmp_path, datasets):
    """JSRT lungs (1) and heart (2): calibration per class and their mean."""
    source = datasets / "jsrt"
    splits = {"reference": ("train", 12), "calibration": ("test", 8)}
    for name, (split, count) in splits.items():
        for path in sorted((source / split / "images").iterdir())[:count]:
            write_png(
                tmp_path / name / "images" / path.name, np.asarray(Image.open(path))
            )
            label = np.asarray(
                Image.open(source / split / "labels_multiclass" / path.name)
            )
            write_png(tmp_path / name / "labels" / path.name, label)
            if name == "calibration":
                for shift in (0, 4, 9):
                    write_png(
                        tmp_path / "models" / f"shift{shift}" / path.name,
                        np.roll(label, shift, axis=0),
                    )
    out = tmp_path / "calibration.json"
    code = main(
        [
            "calibrate",
            "--reference",
            str(tmp_path / "reference"),
            "--calibration",
            str(tmp_path / "calibration"),
            "--predictions",
            str(tmp_path / "models"),
            "--out",
            str(out),
            "--segmenter",
            "patch",
            "--k",
            "2",
            "-q",
        ]
    )
    assert code == 0
    calibration = Calibration.load(out)
    assert calibration.classes == ["1", "2", "mean"]
    points = calibration.points
    for key in ("1", "2"):
        reals = [real for _, real, _ in points[key]["dice"]]
        assert reals[0] > reals[-1]  # the shift hurts each class
    mean_real = [real for _, real, _ in points["mean"]["dice"]]
    per_class = [[real for _, real, _ in points[k]["dice"]] for k in ("1", "2")]
    np.testing.assert_allclose(mean_real, np.mean(per_class, axis=0))
    assert set(calibration.per_image["maps"]) == {"1", "2"}
