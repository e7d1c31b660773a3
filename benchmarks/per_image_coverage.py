"""Per-image interval coverage, measured over many calibration splits.

Run: python benchmarks/per_image_coverage.py [--datasets jsrt,hc18] [--splits 200]

A protocol run scores the per-image intervals on one split: the extra_test
cases, 25 on JSRT, whose points (one per checkpoint) move together, so that
one coverage figure varies by several points with the cases drawn. This
benchmark trains the UNet once per dataset, computes the per-image reverse
scores of every test and extra_test case for each of the 20 checkpoints,
and then repeats the calibration on random splits of the pooled cases: as
many calibration cases as the test split has, the rest held out. Each split
fits the per-image map and its conformal residuals exactly as
``spe calibrate`` does and scores the intervals on the held-out cases.

Reported per dataset: the coverage of the published split (calibrate on
test, score on extra_test, every case), and over the random splits the mean
coverage at 80, 90 and 95% nominal, the 5th to 95th percentile range of the
90% coverage, the share of splits inside 87-93%, and Dice r and MAE.
Writes the "per_image_coverage" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from _report import machine_line, write_section

from spe.cases import CaseSet
from spe.evaluation import interval_coverage, score_estimator
from spe.per_image import (
    PER_IMAGE_METRICS,
    PerImageSettings,
    collect_scores,
    estimate_cases,
    fit_per_image,
    make_descriptor,
    prepare_per_image_reference,
    real_per_case,
)
from spe.pipeline import Settings
from spe.reproduce import ReproduceSettings, train_and_predict
from spe.segmenters import create
from spe.unet import TrainingSettings

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
EPOCHS = {"jsrt": 20, "hc18": 8, "kvasir": 8}
NOMINAL = (0.8, 0.9, 0.95)
DICE = PER_IMAGE_METRICS.index("dice")


def pooled_scores(dataset: str, segmenter_name: str, seed: int) -> dict:
    """Reverse scores and real metrics of every test and extra_test case.

    Returns:
        ``scores`` (models x (cases, k, M)) and ``real`` (models x (cases, M))
        for class "1", ``case_ids``, ``n_test`` (the first cases are test's)
        and timings.
    """
    settings = Settings(max_references=48, seed=seed)
    training = TrainingSettings(epochs=EPOCHS[dataset], image_size=64, seed=seed)
    clock = time.perf_counter()
    run = train_and_predict(
        DATA / dataset,
        settings=settings,
        training=training,
        protocol=ReproduceSettings(),
    )
    model_seconds = time.perf_counter() - clock
    if run.data.classes != [1]:
        raise SystemExit(f"{dataset}: this benchmark is for binary tasks")

    clock = time.perf_counter()
    segmenter = create(segmenter_name, seed=seed)
    per_image = PerImageSettings()
    descriptor = make_descriptor(per_image.descriptor)
    reference = prepare_per_image_reference(
        segmenter, run.data.fit, descriptor, intensity=settings.intensity
    )
    truth = CaseSet(
        cases=run.data.test.cases + run.data.extra_test.cases, source="pooled"
    )
    scores, real = [], []
    for record in run.records:
        masks = record.predictions["test"] | record.predictions["extra_test"]
        predicted = truth.with_masks(masks, record.name)
        scores.append(
            collect_scores(
                segmenter,
                reference,
                predicted,
                run.data.classes,
                per_image,
                threshold=settings.threshold,
                hd95=settings.hd95,
            )["1"]
        )
        real.append(
            real_per_case(predicted, truth, run.data.classes, hd95=settings.hd95)["1"]
        )
    return {
        "scores": scores,
        "real": real,
        "case_ids": truth.case_ids,
        "n_test": len(run.data.test),
        "model_seconds": model_seconds,
        "score_seconds": time.perf_counter() - clock,
    }


def score_split(pooled: dict, calibration: np.ndarray, held_out: np.ndarray, seed: int):
    """Calibrate on some cases, score Dice intervals on the others.

    Returns:
        {"coverage": {nominal: fraction}, "pearson_r", "mae"} over the held-out
        cases x checkpoints.
    """
    ids = np.asarray(pooled["case_ids"])
    record = fit_per_image(
        [{"1": s[calibration]} for s in pooled["scores"]],
        [{"1": r[calibration]} for r in pooled["real"]],
        ids[calibration].tolist(),
        PerImageSettings(),
        seed=seed,
    )
    real = np.concatenate([r[held_out, DICE] for r in pooled["real"]])
    result: dict = {"coverage": {}}
    for nominal in NOMINAL:
        rows = [
            row
            for s in pooled["scores"]
            for row in estimate_cases(
                record, {"1": s[held_out]}, ids[held_out].tolist(), coverage=nominal
            )
        ]
        lows = [row["dice_low"] for row in rows]
        highs = [row["dice_high"] for row in rows]
        result["coverage"][nominal] = interval_coverage(lows, highs, real.tolist())
        if nominal == 0.9:
            result |= score_estimator([row["dice"] for row in rows], real.tolist())
    return result


def evaluate(pooled: dict, n_splits: int, seed: int) -> dict:
    """The published split, then ``n_splits`` random ones of the same sizes."""
    n_cases, n_test = len(pooled["case_ids"]), pooled["n_test"]
    published = score_split(pooled, np.arange(n_test), np.arange(n_test, n_cases), seed)
    rng = np.random.default_rng(seed)
    splits = []
    for index in range(n_splits):
        order = rng.permutation(n_cases)
        splits.append(score_split(pooled, order[:n_test], order[n_test:], seed + index))
    at_90 = np.array([s["coverage"][0.9] for s in splits])
    return {
        "published_split": published,
        "n_splits": n_splits,
        "n_calibration": n_test,
        "n_held_out": n_cases - n_test,
        "mean_coverage": {
            str(nominal): float(np.mean([s["coverage"][nominal] for s in splits]))
            for nominal in NOMINAL
        },
        "coverage_90_p5_p95": [
            float(np.percentile(at_90, 5)),
            float(np.percentile(at_90, 95)),
        ],
        "share_in_87_93": float(np.mean((at_90 >= 0.87) & (at_90 <= 0.93))),
        "mean_pearson_r": float(np.mean([s["pearson_r"] for s in splits])),
        "mean_mae": float(np.mean([s["mae"] for s in splits])),
    }


def markdown(results: dict, args, seconds: float) -> str:
    lines = [
        "## Per-image interval coverage over calibration splits",
        "",
        "`python benchmarks/per_image_coverage.py` (UNet at 64 px, 20 checkpoints, "
        f"{args.segmenter} segmenter, k = 8, top-k regression; {args.splits} random "
        "splits of the pooled test and extra_test cases into calibration and "
        "held-out parts of the protocol's sizes; coverage over held-out cases x "
        f"checkpoints). Run time {seconds / 60:.1f} min.",
        "",
        "| dataset | cases cal / held out | published split 90% | mean 80% | "
        "mean 90% | mean 95% | 90%: 5th-95th pct | splits in 87-93% | Dice r | "
        "Dice MAE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dataset, result in results.items():
        mean = result["mean_coverage"]
        low, high = result["coverage_90_p5_p95"]
        lines.append(
            f"| {dataset} | {result['n_calibration']} / {result['n_held_out']} | "
            f"{result['published_split']['coverage'][0.9]:.3f} | {mean['0.8']:.3f} | "
            f"{mean['0.9']:.3f} | {mean['0.95']:.3f} | {low:.3f}-{high:.3f} | "
            f"{result['share_in_87_93']:.2f} | {result['mean_pearson_r']:.3f} | "
            f"{result['mean_mae']:.3f} |"
        )
    lines += ["", machine_line()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", default="jsrt,hc18")
    parser.add_argument("--segmenter", default="patch", choices=("patch", "atlas"))
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    results = {}
    for dataset in args.datasets.split(","):
        pooled = pooled_scores(dataset, args.segmenter, args.seed)
        results[dataset] = evaluate(pooled, args.splits, args.seed) | {
            "model_seconds": pooled["model_seconds"],
            "score_seconds": pooled["score_seconds"],
        }
        print(f"{dataset}: {json.dumps(results[dataset])}", file=sys.stderr)
    seconds = time.perf_counter() - started
    write_section("per_image_coverage", markdown(results, args, seconds))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "per_image_coverage.json").write_text(
        json.dumps(results | {"seconds": seconds}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()
