"""`spe metrics` end to end: the test vectors through files, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from spe.cli import main


def save(folder, name, mask):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8)).save(folder / f"{name}.png")


def square(shape, box, value=1):
    mask = np.zeros(shape, np.uint8)
    mask[box] = value
    return mask


def run_json(capsys, *args):
    code = main(["metrics", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_vectors_through_the_command_line(tmp_path, capsys):
    predictions, labels = tmp_path / "pred", tmp_path / "gt"
    # T1, with the prediction stored 0/255 (T5) to show encodings don't matter.
    save(labels, "t1", square((32, 32), np.s_[8:16, 8:16]))
    save(predictions, "t1", square((32, 32), np.s_[10:18, 8:16], 255))
    summary = run_json(
        capsys, "--predictions", str(predictions), "--labels", str(labels)
    )
    assert summary["n_cases"] == 1
    t1 = summary["mean"]["1"]
    assert t1["dice"] == pytest.approx(0.75) and t1["jaccard"] == pytest.approx(0.6)
    assert t1["pearson"] == pytest.approx(0.733333, abs=1e-6)
    assert t1["hd95"] == pytest.approx(2.0) and t1["assd"] == pytest.approx(1.0)
    spaced = run_json(
        capsys,
        "--predictions",
        str(predictions),
        "--labels",
        str(labels),
        "--spacing",
        "3,1",
    )
    assert spaced["mean"]["1"]["hd95"] == pytest.approx(6.0)

    # T2 in a second folder, with both HD95 variants.
    predictions, labels = tmp_path / "pred2", tmp_path / "gt2"
    truth = square((64, 64), np.s_[10:30, 10:30])
    prediction = truth.copy()
    prediction[50:53, 50:53] = 1
    save(labels, "t2", truth)
    save(predictions, "t2", prediction)
    default = run_json(
        capsys, "--predictions", str(predictions), "--labels", str(labels)
    )
    union = run_json(
        capsys,
        "--predictions",
        str(predictions),
        "--labels",
        str(labels),
        "--hd95",
        "union",
    )
    assert default["mean"]["1"]["hd95"] == pytest.approx(31.035171, abs=1e-6)
    assert union["mean"]["1"]["hd95"] == pytest.approx(1.484924, abs=1e-6)
    assert default["mean"]["1"]["dice"] == pytest.approx(0.988875, abs=1e-6)


def test_empty_masks_and_full_prediction(tmp_path, capsys):
    predictions, labels = tmp_path / "pred", tmp_path / "gt"
    empty = np.zeros((32, 32), np.uint8)
    mask = square((32, 32), np.s_[8:16, 8:16])
    save(labels, "both_empty", empty)
    save(predictions, "both_empty", empty)
    save(labels, "truth_empty", empty)
    save(predictions, "truth_empty", mask)
    save(labels, "full", mask)  # T6: a prediction covering everything
    save(predictions, "full", np.ones_like(mask))
    out = tmp_path / "out"
    summary = run_json(
        capsys,
        "--predictions",
        str(predictions),
        "--labels",
        str(labels),
        "--out",
        str(out),
    )
    assert summary["n_infinite_distance"]["1"] == 1
    assert summary["infinite_distance_cases"]["1"] == ["truth_empty"]
    assert summary["empty"]["1"] == {"prediction_only": 0, "truth_only": 1, "both": 1}

    rows = {
        line.split(",")[0]: line.split(",")
        for line in (out / "per_case.csv").read_text().splitlines()[1:]
    }
    header = (out / "per_case.csv").read_text().splitlines()[0].split(",")
    column = {name: i for i, name in enumerate(header)}
    assert rows["both_empty"][column["dice"]] == "1"
    assert rows["both_empty"][column["hd95"]] == "0"
    assert rows["truth_empty"][column["dice"]] == "0"
    assert rows["truth_empty"][column["hd95"]] == "inf"
    assert rows["full"][column["pearson"]] == "0"

    # The mean HD95 counts the infinite case as the diagonal of a 32x32 image.
    full_hd95 = float(rows["full"][column["hd95"]])
    expected = (0 + np.hypot(32, 32) + full_hd95) / 3
    assert summary["mean"]["1"]["hd95"] == pytest.approx(expected)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_multiclass_on_real_labels(capsys, datasets):
    labels = datasets / "psfhs" / "test" / "labels"
    summary = run_json(capsys, "--predictions", str(labels), "--labels", str(labels))
    assert summary["classes"] == ["1", "2"]
    assert summary["mean"]["2"]["dice"] == 1.0
    only_head = run_json(
        capsys, "--predictions", str(labels), "--labels", str(labels), "--classes", "2"
    )
    assert only_head["classes"] == ["2"]


def errors_of(capsys, *args):
    code = main(["metrics", *args])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    return code, lines[-1] if lines else ""


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    predictions, labels = tmp_path / "pred", tmp_path / "gt"
    save(labels, "a", square((32, 32), np.s_[8:16, 8:16]))
    save(predictions, "a", square((16, 16), np.s_[2:8, 2:8]))
    code, message = errors_of(
        capsys, "--predictions", str(predictions), "--labels", str(labels)
    )
    assert code == 2
    assert (
        message.startswith("spe: error: ")
        and "a.png: shape (16, 16) differs" in message
    )

    save(predictions, "b", square((32, 32), np.s_[8:16, 8:16]))
    code, message = errors_of(
        capsys, "--predictions", str(predictions), "--labels", str(labels)
    )
    assert code == 2 and "have no match" in message and ": b" in message

    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0] = 255
    (predictions / "b.png").unlink()
    Image.fromarray(colour).save(predictions / "a.png")
    code, message = errors_of(
        capsys, "--predictions", str(predictions), "--labels", str(labels)
    )
    assert code == 2 and "a colour mask with unequal channels" in message

    code, message = errors_of(
        capsys, "--predictions", str(tmp_path / "nope"), "--labels", str(labels)
    )
    assert code == 2 and "nope: no such folder" in message


def test_console_command_has_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spe.cli",
            "metrics",
            "--predictions",
            str(tmp_path / "x"),
            "--labels",
            str(tmp_path / "y"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_one_class_of_a_label_map_is_scored_alone(tmp_path, capsys):
    truth = np.zeros((32, 32), np.uint8)
    truth[4:12, 4:12] = 1
    truth[20:28, 20:28] = 2
    prediction = truth.copy()
    prediction[prediction == 2] = 0  # class 2 missed entirely
    save(tmp_path / "gt", "a", truth)
    save(tmp_path / "pred", "a", prediction)
    args = ["--predictions", str(tmp_path / "pred"), "--labels", str(tmp_path / "gt")]
    only_one = run_json(capsys, *args, "--classes", "1")
    assert only_one["mean"]["1"]["dice"] == 1.0
    both = run_json(capsys, *args)
    assert both["mean"]["2"]["dice"] == 0.0
    code, message = errors_of(capsys, *args, "--classes", "3")
    assert code == 2 and "class 3 is not in" in message


def test_mixed_binary_encodings_are_one_task(tmp_path, capsys):
    mask = square((20, 20), np.s_[5:15, 5:15])
    save(tmp_path / "gt", "a", mask * 255)
    save(tmp_path / "gt", "b", mask)
    save(tmp_path / "pred", "a", mask)
    save(tmp_path / "pred", "b", mask * 255)
    summary = run_json(
        capsys,
        "--predictions",
        str(tmp_path / "pred"),
        "--labels",
        str(tmp_path / "gt"),
    )
    assert summary["classes"] == ["1"] and summary["mean"]["1"]["dice"] == 1.0


def test_intensity_images_as_labels_are_refused(tmp_path, capsys, datasets):
    images = datasets / "jsrt" / "test" / "images"
    code, message = errors_of(
        capsys, "--predictions", str(images), "--labels", str(images)
    )
    assert code == 2 and "looks like intensity images" in message


def test_monai_seg_suffix_on_predictions(tmp_path, capsys):
    predictions, labels = tmp_path / "pred", tmp_path / "gt"
    # T1 again, with the prediction named as MONAI's SaveImage names it.
    save(labels, "t1", square((32, 32), np.s_[8:16, 8:16]))
    save(predictions, "t1_seg", square((32, 32), np.s_[10:18, 8:16]))
    summary = run_json(
        capsys, "--predictions", str(predictions), "--labels", str(labels)
    )
    assert summary["n_cases"] == 1
    assert summary["mean"]["1"]["dice"] == pytest.approx(0.75)
