"""calibrate -> estimate -> evaluate on a small real subset, and their errors.

The "models" are the ground truth of JSRT test cases shifted by growing
amounts, so their real Dice is known to fall with the shift; the reference
set is a handful of JSRT training cases.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from spe.calibration import Calibration, LinearMap
from spe.cli import main
from spe.errors import SPEError

SHIFTS = (0, 3, 6, 10, 15)  # pixels: the five "models", best to worst


def copy_cases(source, destination, case_ids, *, folders=("images", "labels")):
    for folder in folders:
        (destination / folder).mkdir(parents=True, exist_ok=True)
        for case_id in case_ids:
            data = (source / folder / f"{case_id}.png").read_bytes()
            (destination / folder / f"{case_id}.png").write_bytes(data)


def shifted_predictions(labels_folder, destination, case_ids, shift):
    destination.mkdir(parents=True, exist_ok=True)
    for case_id in case_ids:
        mask = np.asarray(Image.open(labels_folder / f"{case_id}.png"))
        Image.fromarray(np.roll(mask, shift, axis=1)).save(
            destination / f"{case_id}.png"
        )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, datasets):
    """Reference (16 train cases), calibration (10 test cases), target (8 extra)."""
    root = tmp_path_factory.mktemp("pipeline")
    jsrt = datasets / "jsrt"
    ids = {
        split: sorted(p.stem for p in (jsrt / split / "images").iterdir())
        for split in ("train", "test", "extra_test")
    }
    # The reference also has JSRT's lungs-and-heart label maps, to be given
    # by mistake as --labels-name.
    copy_cases(
        jsrt / "train",
        root / "reference",
        ids["train"][:16],
        folders=("images", "labels", "labels_multiclass"),
    )
    copy_cases(jsrt / "test", root / "calibration", ids["test"][:10])
    copy_cases(jsrt / "extra_test", root / "target", ids["extra_test"][:8])
    for shift in SHIFTS:
        shifted_predictions(
            root / "calibration" / "labels",
            root / "models" / f"shift{shift:02d}",
            ids["test"][:10],
            shift,
        )
        shifted_predictions(
            root / "target" / "labels",
            root / f"target_shift{shift:02d}",
            ids["extra_test"][:8],
            shift,
        )
    return root


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def calibration_file(workspace):
    path = workspace / "calibration.json"
    code = main(
        [
            "calibrate",
            "--reference",
            str(workspace / "reference"),
            "--calibration",
            str(workspace / "calibration"),
            "--predictions",
            str(workspace / "models"),
            "--out",
            str(path),
            "--segmenter",
            "patch",
            "--k",
            "3",
            "-q",
        ]
    )
    assert code == 0
    return path


def test_calibration_file_records_everything(calibration_file):
    data = json.loads(calibration_file.read_text())
    assert data["schema"] == "spe.calibration" and data["schema_version"] == 1
    assert data["segmenter"]["name"] == "patch"
    assert (
        data["settings"]["threshold"] == 0.5 and data["settings"]["max_support"] == 64
    )
    assert (
        data["reference"]["n_cases"] == 16
        and len(data["reference"]["fingerprint"]) == 16
    )
    dice = data["dataset_level"]["1"]["dice"]
    assert dice["n_points"] == len(SHIFTS)
    # Worse models give lower pseudo Dice: the line rises.
    assert dice["slope"] > 0
    assert data["per_image"]["settings"]["k"] == 3


def estimate_arguments(workspace, calibration_file):
    """`spe estimate` on the workspace's target images, before --predictions."""
    return [
        "estimate",
        "--calibration",
        str(calibration_file),
        "--reference",
        str(workspace / "reference"),
        "--images",
        str(workspace / "target" / "images"),
        "-q",
    ]


def estimate_json(capsys, workspace, calibration_file, predictions, out):
    """`spe estimate --json` with these predictions, its JSON output."""
    code, stdout, err = run(
        capsys,
        *estimate_arguments(workspace, calibration_file),
        "--predictions",
        str(predictions),
        "--out",
        str(out),
        "--json",
    )
    assert code == 0, err
    return json.loads(stdout)


def test_estimates_follow_the_real_quality(workspace, calibration_file, capsys):
    estimates = {
        shift: estimate_json(
            capsys,
            workspace,
            calibration_file,
            workspace / f"target_shift{shift:02d}",
            workspace / f"estimate{shift}",
        )
        for shift in (0, 10)
    }
    good = estimates[0]["estimates"]["1"]["dice"]
    bad = estimates[10]["estimates"]["1"]["dice"]
    assert good["estimate"] > bad["estimate"] + 0.1
    assert good["low"] <= good["estimate"] <= good["high"]

    # Per-case rows with intervals and flags, and the flagged list.
    rows = (workspace / "estimate10" / "per_case.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:5] == ["case_id", "class", "dice", "dice_low", "dice_high"]
    assert header[-1] == "flag" and len(rows) == 1 + 8
    per_case = estimates[10]["per_case"]
    assert per_case["n_flagged"] == len(per_case["flagged"])


def test_monai_named_predictions_give_the_same_estimate(
    workspace, calibration_file, capsys
):
    # MONAI's SaveImage writes case_seg.png: the same masks under those names.
    renamed = workspace / "target_shift10_monai"
    renamed.mkdir(exist_ok=True)
    for path in (workspace / "target_shift10").iterdir():
        (renamed / f"{path.stem}_seg{path.suffix}").write_bytes(path.read_bytes())
    estimates = [
        estimate_json(
            capsys,
            workspace,
            calibration_file,
            folder,
            workspace / f"estimate_{folder.name}",
        )["estimates"]
        for folder in (workspace / "target_shift10", renamed)
    ]
    assert estimates[0] == estimates[1]


def test_evaluate_scores_the_estimates(workspace, calibration_file, capsys):
    code, out, err = run(
        capsys,
        "evaluate",
        "--calibration",
        str(calibration_file),
        "--reference",
        str(workspace / "reference"),
        "--target",
        str(workspace / "target"),
        "--predictions",
        str(workspace / "target_shift06"),
        "--out",
        str(workspace / "evaluate"),
        "--json",
        "-q",
    )
    assert code == 0, err
    result = json.loads(out)
    dice = result["dataset_level"]["1"]["dice"]
    assert abs(dice["error"]) < 0.05 and dice["inside_interval"]
    assert set(result["per_image"]["dice"]) >= {
        "pearson_r",
        "mae",
        "coverage",
        "auroc_failure",
    }


def test_no_support_is_an_empty_segmentation(workspace, calibration_file, capsys):
    empty = workspace / "target_empty"
    empty.mkdir(exist_ok=True)
    for path in (workspace / "target" / "labels").iterdir():
        Image.fromarray(np.zeros((128, 128), np.uint8)).save(empty / path.name)
    result = estimate_json(
        capsys, workspace, calibration_file, empty, workspace / "estimate_empty"
    )
    assert result["support"]["1"]["n_support"] == 0
    assert result["estimates_from_pseudo"]["1"]["dice"]["pseudo"] == 0.0
    assert any("empty segmentation" in w for w in result["warnings"])
    # Every image is flagged, and the dataset estimate lies far below any
    # model seen in calibration.
    assert result["estimates"]["1"]["dice"]["estimate"] < 0.2
    assert result["per_case"]["n_flagged"] == 8
    assert any("outside the calibrated range" in w for w in result["warnings"])


def test_mismatched_inputs_are_one_line_errors(workspace, calibration_file, capsys):
    base = [
        *estimate_arguments(workspace, calibration_file),
        "--out",
        str(workspace / "estimate_error"),
    ]

    # Missing predictions for some cases.
    partial = workspace / "partial"
    partial.mkdir(exist_ok=True)
    first = sorted((workspace / "target_shift00").iterdir())[0]
    (partial / first.name).write_bytes(first.read_bytes())
    code, _, err = run(capsys, *base, "--predictions", str(partial))
    assert code == 2 and "have no match in" in err and err.count("\n") == 1

    # Predictions of another size.
    small = workspace / "small"
    small.mkdir(exist_ok=True)
    for path in (workspace / "target_shift00").iterdir():
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(small / path.name)
    code, _, err = run(capsys, *base, "--predictions", str(small))
    assert code == 2 and "differs from its image's (128, 128)" in err

    # A calibration made with another segmenter, or another labels folder.
    good = ["--predictions", str(workspace / "target_shift00")]
    for option, expected in (
        (["--segmenter", "atlas"], "made with the 'patch'"),
        (["--labels-name", "labels_multiclass"], "with the labels folder 'labels'"),
    ):
        code, _, err = run(capsys, *base, *good, *option)
        assert code == 2 and expected in err

    # Another reference set.
    other = workspace / "other_reference"
    copy_cases(
        workspace / "reference",
        other,
        sorted(p.stem for p in (workspace / "reference" / "images").iterdir())[:8],
    )
    arguments = [str(other) if a == str(workspace / "reference") else a for a in base]
    code, _, err = run(capsys, *arguments, *good)
    assert code == 2 and "differ from those calibrated with" in err


def test_calibration_json_round_trip_and_validation(calibration_file, tmp_path):
    calibration = Calibration.load(calibration_file)
    copy = tmp_path / "copy.json"
    calibration.save(copy)
    assert json.loads(copy.read_text()) == json.loads(calibration_file.read_text())

    data = json.loads(calibration_file.read_text())
    for change, message in (
        (lambda d: d.update(schema="other"), "not an SPE calibration file"),
        (lambda d: d.update(schema_version=99), "schema version 99"),
        (lambda d: d.pop("reference"), "misses reference"),
        (lambda d: d["dataset_level"]["1"]["dice"].pop("slope"), "dice .* malformed"),
    ):
        broken = json.loads(json.dumps(data))
        change(broken)
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        with pytest.raises(SPEError, match=message):
            Calibration.load(tmp_path / "broken.json")
    (tmp_path / "text.json").write_text("{not json")
    with pytest.raises(SPEError, match="not a readable JSON"):
        Calibration.load(tmp_path / "text.json")


def test_linear_map_and_prediction_interval_by_hand():
    # Points on y = 2x + 1 with residuals +-0.1: slope 2, intercept 1.
    x = [0.0, 1.0, 2.0, 3.0]
    y = [1.1, 2.9, 5.1, 6.9]
    fit = LinearMap.fit(x, y)
    assert fit.slope == pytest.approx(1.96)
    assert fit.intercept == pytest.approx(1.06)
    residuals = np.array(y) - (1.96 * np.array(x) + 1.06)
    sd = math.sqrt((residuals**2).sum() / 2)
    assert fit.residual_sd == pytest.approx(sd)
    # 90% interval at x = 1.5 (the mean): t(0.95, 2) = 2.919986 ...
    half = fit.interval_half_width(1.5, 0.9)
    assert half == pytest.approx(2.919986 * sd * math.sqrt(1 + 1 / 4), rel=1e-6)
    # ... and wider away from the mean (Sxx = 5).
    assert fit.interval_half_width(3.0, 0.9) == pytest.approx(
        2.919986 * sd * math.sqrt(1 + 1 / 4 + 1.5**2 / 5), rel=1e-6
    )
    with pytest.raises(SPEError, match="at least 3"):
        LinearMap.fit([0.1, 0.2], [0.3, 0.4])
