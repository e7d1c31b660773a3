"""`spe reproduce` on real data with tiny settings: outputs, names, determinism."""

from __future__ import annotations

import json

import pytest

from spe.cli import main
from spe.reproduce import choose_checkpoints, spread_indices

QUICK = " ".join(
    [
        "--epochs 4 --image-size 32 --width 8 --checkpoints 5 --max-references 8",
        "--per-image-checkpoints 3 --per-image-max-cases 6 --k 3 --segmenter patch -q",
    ]
).split()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, datasets):
    outputs = []
    for run in range(2):
        out = tmp_path_factory.mktemp(f"reproduce{run}")
        # The second run also saves its predictions; results stay the same.
        save = ["--save-predictions"] if run == 1 else []
        assert (
            main(
                [
                    "reproduce",
                    "--dataset",
                    str(datasets / "jsrt"),
                    "--out",
                    str(out),
                    *QUICK,
                    *save,
                ]
            )
            == 0
        )
        outputs.append(out)
    return outputs


def test_results_have_the_documented_names(two_runs):
    results = json.loads((two_runs[0] / "results.json").read_text())
    assert results["dataset"] == "jsrt" and results["segmenter"] == "patch"
    assert results["seconds"] > 0 and results["method"] == "per-image mean"
    for metric in ("dice", "jaccard", "precision", "recall", "pearson", "hd95"):
        scores = results["dataset_level"][metric]
        assert set(scores) >= {"pearson_r", "mae", "n_checkpoints", "coverage"}
        # The dataset estimate from per-image ones uses the per-image
        # checkpoints; the published one from pseudo metrics uses all five.
        assert scores["n_checkpoints"] == 3
        assert results["dataset_level_published"][metric]["n_checkpoints"] == 5
        for baseline in ("training_score", "prediction_area"):
            assert set(results["baselines"][baseline][metric]) >= {"pearson_r", "mae"}
        assert set(results["per_image"][metric]) >= {
            "pearson_r",
            "mae",
            "coverage",
            "auroc_failure",
        }
    assert (two_runs[0] / "results.csv").read_text().startswith("checkpoint,step,")
    for metric in ("dice", "hd95"):
        assert (two_runs[0] / f"scatter_{metric}.png").stat().st_size > 1000


def test_same_seed_same_results(two_runs):
    first, second = (json.loads((out / "results.json").read_text()) for out in two_runs)
    for results in (first, second):
        for name in ("seconds", "timings", "peak_memory_mb", "per_image_settings"):
            results.pop(name)
    assert first == second


def test_saved_predictions_feed_metrics_and_calibrate(two_runs, datasets, capsys):
    out = two_runs[1]
    results = json.loads((out / "results.json").read_text())
    names = [row["name"] for row in results["checkpoints"]]
    predictions = out / "predictions"
    assert sorted(p.name for p in (predictions / "test").iterdir()) == sorted(names)
    n_test = len(list((datasets / "jsrt/test/images").iterdir()))
    assert len(list((predictions / "test" / names[0]).glob("*.png"))) == n_test

    # The saved masks, scored from disk by `spe metrics`, give the real Dice
    # the protocol measured in memory.
    last = results["checkpoints"][-1]
    capsys.readouterr()
    code = main(
        [
            "metrics",
            "--predictions",
            str(predictions / "extra_test" / last["name"]),
            "--labels",
            str(datasets / "jsrt/extra_test/labels"),
            "--json",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    real = last["classes"]["1"]["dice"]["extra_test_real"]
    assert summary["mean"]["1"]["dice"] == pytest.approx(real, abs=1e-9)

    # They are a --predictions folder of spe calibrate as they are.
    code = main(
        [
            "calibrate",
            "--reference",
            str(datasets / "jsrt/train"),
            "--calibration",
            str(datasets / "jsrt/test"),
            "--predictions",
            str(predictions / "test"),
            "--out",
            str(out / "calibration.json"),
            "--max-references",
            "8",
            "--no-per-image",
            "--segmenter",
            "patch",
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    calibration = json.loads((out / "calibration.json").read_text())
    assert len(calibration["points"]["1"]["dice"]) == len(names)


def test_checkpoints_spread_over_validation_dice():
    dice = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8]
    chosen = choose_checkpoints(dice, 3)
    assert sorted(dice[i] for i in chosen) == [0.1, 0.5, 0.9]
    # Many equal early models: one of them, then the rest of the range.
    crowded = [0.17] * 6 + [0.3, 0.6, 0.9]
    chosen = choose_checkpoints(crowded, 4)
    assert [crowded[i] for i in chosen] == [0.17, 0.3, 0.6, 0.9]
    assert spread_indices(10, 3) == [0, 4, 9]  # 4.5 rounds to even
    assert spread_indices(2, 5) == [0, 1]


def test_missing_split_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    code = main(
        [
            "reproduce",
            "--dataset",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            *QUICK,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "missing test, extra_test" in err


def test_predictions_of_an_earlier_run_are_not_mixed_in(tmp_path, capsys, datasets):
    earlier = tmp_path / "out" / "predictions" / "test" / "step7"
    earlier.mkdir(parents=True)
    (earlier / "JPCLN001.png").write_bytes(b"")
    code = main(
        [
            "reproduce",
            "--dataset",
            str(datasets / "jsrt"),
            "--out",
            str(tmp_path / "out"),
            "--save-predictions",
            *QUICK,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "holds masks of an earlier run" in err
    assert len(err.strip().splitlines()) == 1
