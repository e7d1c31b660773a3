"""Inputs users get wrong: each is one line on stderr and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from spe import io
from spe.calibration import Calibration, check_spread
from spe.cli import main
from spe.errors import SPEError


def save(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(folder / name)


def one_line_error(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("spe: error: ") and "Traceback" not in "".join(err)
    return err[-1]


@pytest.fixture
def masks(tmp_path):
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 255
    save(tmp_path / "gt", "a.png", mask)
    save(tmp_path / "pred", "a.png", mask)
    return tmp_path


def metrics_arguments(masks):
    """`spe metrics` on the fixture's one prediction and label."""
    return [
        "metrics",
        "--predictions",
        str(masks / "pred"),
        "--labels",
        str(masks / "gt"),
    ]


def test_outputs_that_cannot_be_written(masks, capsys):
    args = metrics_arguments(masks)
    (masks / "file").write_text("x")
    message = one_line_error(capsys, *args, "--out", str(masks / "file" / "out"))
    assert "file" in message
    (masks / "out" / "summary.json").mkdir(parents=True)
    message = one_line_error(capsys, *args, "--out", str(masks / "out"))
    assert "summary.json: is a folder" in message
    assert not (masks / "out" / "per_case.csv").exists()  # nothing half written


def test_usage_mistakes_are_one_line(masks, capsys):
    message = one_line_error(capsys, "metrics", "--labels", str(masks / "gt"))
    assert "--predictions" in message
    message = one_line_error(capsys, "estimate", "--coverage", "1.5")
    assert "between 0 and 1" in message


def test_spacing_mistakes(masks, capsys):
    args = metrics_arguments(masks)
    assert "--spacing" in one_line_error(capsys, *args, "--spacing", "1e200,1")
    assert "--spacing" in one_line_error(capsys, *args, "--spacing", "nan,1")
    table = masks / "spacing.csv"
    table.write_text("case_id,mm\na,0.5\na,0.7\n")
    assert "appears twice" in one_line_error(capsys, *args, "--spacing-csv", str(table))
    assert "not both" in one_line_error(
        capsys, *args, "--spacing-csv", str(table), "--spacing", "1,1"
    )
    # A spreadsheet's UTF-8 byte-order mark is fine.
    table.write_bytes("\ufeffcase_id,mm\na,0.5\n".encode())
    assert io.read_spacing_table(table) == {"a": (0.5,)}
    table.write_bytes("case_id,mm\n\xe4,0.5\n".encode("latin-1"))
    with pytest.raises(SPEError, match="save it as UTF-8"):
        io.read_spacing_table(table)


def test_jpeg_masks_are_refused(tmp_path, capsys):
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 255
    Image.fromarray(mask).save(tmp_path / "a.jpg")
    with pytest.raises(SPEError, match="mask saved as JPEG"):
        io.read_mask(tmp_path / "a.jpg")


def test_hidden_files_are_skipped(masks):
    (masks / "gt" / "._a.png").write_bytes(b"\x00\x01")
    (masks / "gt" / ".DS_Store").write_bytes(b"\x00")
    assert list(io.list_cases(masks / "gt")) == ["a"]


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory, datasets):
    """A real calibration of JSRT heart from four shifted copies of the truth."""
    root = tmp_path_factory.mktemp("calibration")
    jsrt = datasets / "jsrt"
    for split, name, count in (("train", "reference", 8), ("test", "calibration", 6)):
        for path in sorted((jsrt / split / "images").iterdir())[:count]:
            for folder in ("images", "labels"):
                source = jsrt / split / folder / path.name
                save(root / name / folder, path.name, np.asarray(Image.open(source)))
            if name == "calibration":
                label = np.asarray(Image.open(jsrt / split / "labels" / path.name))
                for shift in (0, 5, 10, 16):
                    save(
                        root / "models" / f"s{shift}",
                        path.name,
                        np.roll(label, shift, axis=1),
                    )
    code = main(
        [
            "calibrate",
            "--reference",
            str(root / "reference"),
            "--calibration",
            str(root / "calibration"),
            "--predictions",
            str(root / "models"),
            "--out",
            str(root / "c.json"),
            "--no-per-image",
            "-q",
        ]
    )
    assert code == 0
    return root / "c.json"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.update(classes=1), "classes"),
        (lambda d: d.update(dataset_level=[]), "dataset_level"),
        (lambda d: d["dataset_level"]["1"]["dice"].update(slope="1.2"), "dice"),
        (lambda d: d["dataset_level"]["1"]["dice"].update(n_points=0), "dice"),
        (lambda d: d["dataset_level"]["1"]["dice"].update(residual_sd=-1), "dice"),
        (lambda d: d["reference"].pop("fingerprint"), "reference"),
        (lambda d: d.update(segmenter="patch"), "segmenter"),
        (lambda d: d.update(metrics=[]), "metrics"),
    ],
)
def test_damaged_calibration_files(calibration_file, tmp_path, edit, field):
    data = json.loads(calibration_file.read_text())
    edit(data)
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(SPEError, match=field):
        Calibration.load(tmp_path / "c.json")


def test_damaged_settings_fail_before_any_work(calibration_file, tmp_path, capsys):
    data = json.loads(calibration_file.read_text())
    data["settings"]["min_area"] = "ten"
    (tmp_path / "c.json").write_text(json.dumps(data))
    message = one_line_error(
        capsys,
        "estimate",
        "--calibration",
        str(tmp_path / "c.json"),
        "--reference",
        str(tmp_path / "missing"),
        "--images",
        str(tmp_path),
        "--predictions",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
    )
    assert "settings are malformed (min_area)" in message


def test_models_of_equal_quality_cannot_calibrate(calibration_file, capsys):
    root = calibration_file.parent
    same = root / "same"
    for name in ("m1", "m2", "m3"):
        for path in (root / "models" / "s5").iterdir():
            save(same / name, path.name, np.asarray(Image.open(path)))
    message = one_line_error(
        capsys,
        "calibrate",
        "--reference",
        str(root / "reference"),
        "--calibration",
        str(root / "calibration"),
        "--predictions",
        str(same),
        "--out",
        str(root / "same.json"),
        "--no-per-image",
        "-q",
    )
    assert "is the same" in message and "different quality" in message


def test_volumes_against_a_two_dimensional_calibration(
    calibration_file, datasets, capsys
):
    la3d = datasets / "la3d" / "test"
    message = one_line_error(
        capsys,
        "estimate",
        "--calibration",
        str(calibration_file),
        "--reference",
        str(calibration_file.parent / "reference"),
        "--images",
        str(la3d / "images"),
        "--predictions",
        str(la3d / "labels"),
        "--out",
        str(calibration_file.parent / "out3d"),
        "-q",
    )
    assert "holds 2-D images but" in message and "3-D volumes" in message


def test_predictions_of_another_task_are_refused(calibration_file, datasets, capsys):
    root = calibration_file.parent
    jsrt = datasets / "jsrt" / "extra_test"
    images = sorted((jsrt / "images").iterdir())[:3]
    multiclass = root / "multiclass_predictions"
    for path in images:
        label = np.asarray(Image.open(jsrt / "labels_multiclass" / path.name))
        save(multiclass, path.name, label)
        save(root / "few_images", path.name, np.asarray(Image.open(path)))
    message = one_line_error(
        capsys,
        "estimate",
        "--calibration",
        str(calibration_file),
        "--reference",
        str(root / "reference"),
        "--images",
        str(root / "few_images"),
        "--predictions",
        str(multiclass),
        "--out",
        str(root / "out_labels"),
        "-q",
    )
    assert "holds labels [1, 2] but the task is binary" in message


def test_a_class_no_model_predicts_points_at_label_values():
    with pytest.raises(SPEError, match="label values of the labels folder"):
        check_spread([0.0, 0.0, 0.0], [0.1, 0.5, 0.9], "2", "dice")


def test_a_failed_command_leaves_no_output_folder_it_made(tmp_path, capsys):
    (tmp_path / "labels").mkdir()
    made = tmp_path / "new" / "results"
    arguments = ["metrics", "--labels", str(tmp_path / "labels")]
    arguments += ["--predictions", str(tmp_path / "missing")]
    one_line_error(capsys, *arguments, "--out", str(made))
    assert not (tmp_path / "new").exists()

    # A folder that was there before is the user's: it stays.
    kept = tmp_path / "kept"
    kept.mkdir()
    one_line_error(capsys, *arguments, "--out", str(kept))
    assert kept.is_dir()
