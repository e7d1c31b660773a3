"""The shift benchmark: do the estimates see a drop in performance?

Run: python benchmarks/shift.py [--variants minmax,equalize] [--json]

A UNet is trained on JSRT (heart) and G is fitted on the unshifted test split
over 20 checkpoints, as a user would calibrate. Then extra_test is shifted
(seven families of synthetic shifts at five severities; the reference set is
never shifted), the best and a middle checkpoint predict the shifted images,
and the estimate is compared with the real Dice, next to the baselines: the
checkpoint's validation score and the prediction-area line. A natural shift
is added: a fetal-head model trained on HC18 estimated on the fetal-head
class of PSFHS (another device and view), calibrated on HC18's test split.

Variants of the method, compared on the same conditions:

- ``minmax``: the published method (images min-max scaled);
- ``equalize``: histogram equalisation of support and reference images;
- ``local``: local standardisation of log intensities (see spe.intensity);
- ``+per-image``: the dataset estimate is G applied to the mean of calibrated
  per-image estimates (single-image supports) instead of the pseudo Dice;
- ``+shift-aware``: G fitted on test under synthetic shifts as well as over
  checkpoints; when scoring a condition, the shifts of its own family are
  left out of the fit, so no condition is calibrated on itself.

Writes the "shift" section of docs/benchmarks.md; with --json prints
``{"shift": {condition: {...}}, "summary": {...}, "variants": {...}}`` for
the default variant under "shift" and "summary".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from _report import machine_line, write_section
from tqdm import tqdm

from spe.calibration import LinearMap, apply_map, clip_metric, widen_by_disagreement
from spe.cases import Case, CaseSet, load_labeled
from spe.evaluation import foreground_fraction, interval_coverage, pearson_r
from spe.intensity import INTENSITY_MODES
from spe.per_image import (
    PerImageSettings,
    collect_scores,
    estimate_cases,
    fit_per_image,
    make_descriptor,
    prepare_per_image_reference,
    real_per_case,
)
from spe.pipeline import Settings, compute_pseudo, compute_real, prepare_references
from spe.reproduce import (
    CheckpointRecord,
    ProtocolRun,
    ReproduceSettings,
    spread_indices,
    train_and_predict,
)
from spe.segmenters import create
from spe.shifts import FAMILIES, Shift, all_shifts, apply_shift
from spe.unet import TrainingSettings, predict

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
VARIANTS = (
    "minmax",
    "equalize",
    "local",
    "local+per-image",
    "local+shift-aware",
    "local+per-image+shift-aware",
)
# What the product does by default (shift-aware calibration needs the model
# itself to predict shifted calibration images, which `spe calibrate` cannot).
DEFAULT_VARIANT = "local+per-image"
CALIBRATION_SEVERITIES = (2, 4)  # shifts the shift-aware calibration sees
CALIBRATION_CHECKPOINTS = 5
DROP = 0.1  # conditions where real Dice is this far below the validation score


@dataclass
class Point:
    """One (condition, checkpoint): the shifted target with its predictions."""

    name: str
    family: str
    record: CheckpointRecord
    predicted: CaseSet  # shifted images, masks = the checkpoint's predictions
    truth: CaseSet  # shifted images, masks = ground truth
    real: float
    area: float


def shifted(cases: CaseSet, shift: Shift, seed: int) -> CaseSet:
    """The cases with shifted images; labels untouched."""
    return CaseSet(
        cases=[
            Case(
                c.case_id,
                apply_shift(c.image, shift, seed=seed, is_volume=c.is_volume),
                c.spacing,
                c.mask,
            )
            for c in cases.cases
        ],
        source=f"{cases.source} [{shift.name}]",
    )


def checkpoint_index(run: ProtocolRun, record: CheckpointRecord) -> int:
    return run.model.steps.index(record.step)


def pick_checkpoints(run: ProtocolRun) -> dict[str, CheckpointRecord]:
    """The best checkpoint by validation Dice, and the middle one."""
    order = np.argsort([r.validation["1"]["dice"] for r in run.records])
    return {
        "best": run.records[int(order[-1])],
        "middle": run.records[int(order[len(order) // 2])],
    }


def make_point(
    run: ProtocolRun, record: CheckpointRecord, truth: CaseSet, name: str, family: str
) -> Point:
    """Predict ``truth``'s images with a checkpoint and score for real."""
    masks = predict(run.model, checkpoint_index(run, record), truth)
    predicted = truth.with_masks(masks, name)
    return Point(
        name=name,
        family=family,
        record=record,
        predicted=predicted,
        truth=truth,
        real=compute_real(predicted, truth, [1])["1"]["dice"],
        area=foreground_fraction(predicted, [1])["1"],
    )


def synthetic_points(run: ProtocolRun, seed: int, wrap: Callable) -> list[Point]:
    checkpoints = pick_checkpoints(run)
    points = []
    for shift in wrap(all_shifts(), "shifting extra_test"):
        truth = shifted(run.data.extra_test, shift, seed)
        for label, record in checkpoints.items():
            points.append(
                make_point(run, record, truth, f"{shift.name}/{label}", shift.family)
            )
    return points


def natural_points(run: ProtocolRun) -> list[Point]:
    """The HC18 model on PSFHS fetal heads (label 2), both checkpoints."""
    psfhs = load_labeled(DATA / "psfhs" / "extra_test")
    truth = CaseSet(
        cases=[
            Case(c.case_id, c.image, c.spacing, (c.mask == 2).astype(np.uint8))
            for c in psfhs.cases
        ],
        source="psfhs extra_test (fetal head)",
    )
    return [
        make_point(run, record, truth, f"natural-psfhs/{label}", "natural")
        for label, record in pick_checkpoints(run).items()
    ]


# ---------------------------------------------------------------------------
# Variants of the estimator


class Estimator:
    """Fits on a run's unshifted test split; estimates points of that run."""

    def __init__(
        self,
        variant: str,
        run: ProtocolRun,
        settings: Settings,
        seed: int,
        wrap: Callable,
    ) -> None:
        self.variant, self.run, self.seed, self.wrap = variant, run, seed, wrap
        # A variant is an intensity mode, optionally "+per-image" and/or
        # "+shift-aware" (e.g. "local+per-image+shift-aware").
        parts = variant.split("+")
        intensity = parts[0] if parts[0] in INTENSITY_MODES else "local"
        self.per_image_mode = "per-image" in parts
        self.shift_aware = "shift-aware" in parts
        self.settings = replace(settings, intensity=intensity)
        self.segmenter = create("patch", seed=seed)
        self.reference = prepare_references(self.segmenter, run.data.fit, self.settings)
        # (statistic G maps, pseudo Dice, real Dice, shift family) per point.
        self.points: list[tuple[float, float, float, str]] = []

        if self.per_image_mode:
            self.per_image = PerImageSettings()
            self.per_image_reference = prepare_per_image_reference(
                self.segmenter,
                run.data.fit,
                make_descriptor(self.per_image.descriptor),
                intensity=self.settings.intensity,
            )
            self._fit_per_image()

        for record in wrap(run.records, f"calibrating {variant}"):
            target = predictions_of_test(record, run)
            self.points.append(
                (*self.statistics(target), record.real["test"]["1"]["dice"], "none")
            )
        if self.shift_aware:
            chosen = [
                run.records[i]
                for i in spread_indices(len(run.records), CALIBRATION_CHECKPOINTS)
            ]
            shifts = [Shift(f, s) for f in FAMILIES for s in CALIBRATION_SEVERITIES]
            for shift in wrap(shifts, "shift-aware calibration"):
                truth = shifted(run.data.test, shift, seed + 1)
                for record in chosen:
                    point = make_point(run, record, truth, shift.name, shift.family)
                    self.points.append(
                        (*self.statistics(point.predicted), point.real, shift.family)
                    )

        self.area_line = LinearMap.fit(
            [r.area["test"]["1"] for r in run.records],
            [r.real["test"]["1"]["dice"] for r in run.records],
        )

    def _fit_per_image(self) -> None:
        chosen = [
            self.run.records[i]
            for i in spread_indices(len(self.run.records), CALIBRATION_CHECKPOINTS)
        ]
        scores, real = [], []
        for record in chosen:
            target = predictions_of_test(record, self.run)
            scores.append(self._scores(target))
            real.append(real_per_case(target, self.run.data.test, [1], hd95="max"))
        self.per_image_record = fit_per_image(
            scores, real, self.run.data.test.case_ids, self.per_image, seed=self.seed
        )

    def _scores(self, target: CaseSet) -> dict:
        return collect_scores(
            self.segmenter,
            self.per_image_reference,
            target,
            [1],
            self.per_image,
            threshold=self.settings.threshold,
            hd95="max",
        )

    def statistics(self, target: CaseSet) -> tuple[float, float]:
        """(the statistic G maps, the pseudo Dice): they are the same unless
        the dataset estimate comes from the mean per-image estimate."""
        pseudo = compute_pseudo(
            self.segmenter, self.reference, target, [1], self.settings
        ).scores["1"]["dice"]
        if not self.per_image_mode:
            return pseudo, pseudo
        rows = estimate_cases(
            self.per_image_record, self._scores(target), target.case_ids, coverage=0.9
        )
        return float(np.mean([row["dice"] for row in rows])), pseudo

    def estimate(self, point: Point) -> dict[str, float]:
        """Estimate, interval and baselines for one point."""
        used = [p for p in self.points if p[3] != point.family]
        real = [p[2] for p in used]
        statistic, pseudo = self.statistics(point.predicted)
        line = LinearMap.fit([p[0] for p in used], real)
        result = apply_map(line, "dice", statistic, coverage=0.9).as_dict()
        if self.per_image_mode:
            # As the product does: widen by the disagreement with the
            # pseudo-based estimate.
            pseudo_line = LinearMap.fit([p[1] for p in used], real)
            published = apply_map(pseudo_line, "dice", pseudo, coverage=0.9)
            result = widen_by_disagreement(result, published.as_dict(), "dice")
        return {
            "real": point.real,
            "estimate": result["estimate"],
            "low": result["low"],
            "high": result["high"],
            "training_score": point.record.validation["1"]["dice"],
            "prediction_area": clip_metric("dice", self.area_line.predict(point.area)),
        }


def predictions_of_test(record: CheckpointRecord, run: ProtocolRun) -> CaseSet:
    masks = record.predictions["test"]
    return run.data.test.with_masks(
        {c.case_id: masks[c.case_id] for c in run.data.test.cases}, "test"
    )


# ---------------------------------------------------------------------------
# Scores over conditions


def summarize(rows: dict[str, dict[str, float]]) -> dict[str, object]:
    """Scores over the conditions whose real Dice dropped by DROP or more."""
    dropped = {n: r for n, r in rows.items() if r["real"] <= r["training_score"] - DROP}

    def scores(selected):
        real = [r["real"] for r in selected.values()]
        estimate = [r["estimate"] for r in selected.values()]
        if not real:
            return {"n": 0}
        return {
            "n": len(real),
            "mae": float(np.mean(np.abs(np.subtract(estimate, real)))),
            "pearson_r": pearson_r(estimate, real),
            "coverage": interval_coverage(
                [r["low"] for r in selected.values()],
                [r["high"] for r in selected.values()],
                real,
            ),
            "baselines": {
                name: {
                    "mae": float(
                        np.mean(
                            np.abs(
                                np.subtract([r[name] for r in selected.values()], real)
                            )
                        )
                    )
                }
                for name in ("training_score", "prediction_area")
            },
        }

    # The targets are set on the dropped conditions: they are the summary's
    # own keys; "all" scores every condition.
    return scores(dropped) | {"all": scores(rows)}


def markdown(variants: dict, timings: dict, args) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "## Estimates under distribution shift",
        "",
        f"`python benchmarks/shift.py` (JSRT heart; UNet {args.epochs} epochs at "
        "64 px without intensity augmentation; G fitted on the",
        "unshifted test split over 20 checkpoints; extra_test shifted by 7 families",
        "x 5 severities and predicted by the best and a middle checkpoint; natural",
        "shift: an HC18 fetal-head model on PSFHS fetal heads, calibrated on HC18;",
        f"patch segmenter, 48 references). Run time {timings['total'] / 60:.1f} min.",
        "",
        f"Summary over the points whose real Dice is at least {DROP} below the",
        'checkpoint\'s validation score ("dropped"), and over all points:',
        "",
        "| variant | points | MAE | r | 90% coverage | train-score MAE | area MAE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in variants.items():
        for subset in ("dropped", "all"):
            s = result["summary"] if subset == "dropped" else result["summary"]["all"]
            if not s.get("n"):
                continue
            lines.append(
                f"| {name} ({subset}) | {s['n']} | {fmt(s['mae'])} | "
                f"{fmt(s['pearson_r'])} | {fmt(s['coverage'])} | "
                f"{fmt(s['baselines']['training_score']['mae'])} | "
                f"{fmt(s['baselines']['prediction_area']['mae'])} |"
            )
    default = variants.get(DEFAULT_VARIANT) or next(iter(variants.values()))
    lines += [
        "",
        f"Per condition ({DEFAULT_VARIANT if DEFAULT_VARIANT in variants else ''}"
        " variant): real Dice, estimate [90% interval], baselines.",
        "",
        "| condition | real | estimate | interval | train-score | area |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in default["shift"].items():
        lines.append(
            f"| {name} | {row['real']:.3f} | {row['estimate']:.3f} | "
            f"[{row['low']:.3f}, {row['high']:.3f}] | {row['training_score']:.3f} | "
            f"{row['prediction_area']:.3f} |"
        )
    lines += ["", machine_line()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()

    def wrap(items, description):
        return tqdm(items, desc=description, leave=False, file=sys.stderr)

    settings = Settings(max_references=48, seed=args.seed)
    # Without intensity augmentation: a model that shifts hurt, as they hurt
    # many deployed models, so that there are drops for the estimates to see.
    training = TrainingSettings(
        epochs=args.epochs, image_size=64, seed=args.seed, augment=False
    )
    runs = {}
    for dataset in ("jsrt", "hc18"):
        runs[dataset] = train_and_predict(
            DATA / dataset,
            settings=settings,
            training=training,
            protocol=ReproduceSettings(),
        )
    points = {
        "jsrt": synthetic_points(runs["jsrt"], args.seed, wrap),
        "hc18": natural_points(runs["hc18"]),
    }
    timings = {"models": time.perf_counter() - started}

    variants = {}
    for variant in args.variants.split(","):
        clock = time.perf_counter()
        rows = {}
        for dataset, run in runs.items():
            estimator = Estimator(variant, run, settings, args.seed, wrap)
            for point in wrap(points[dataset], f"estimating {variant}"):
                rows[point.name] = estimator.estimate(point)
        variants[variant] = {"shift": rows, "summary": summarize(rows)}
        timings[variant] = time.perf_counter() - clock
        print(f"{variant}: {json.dumps(variants[variant]['summary'])}", file=sys.stderr)
    timings["total"] = time.perf_counter() - started

    write_section("shift", markdown(variants, timings, args))
    default = variants.get(DEFAULT_VARIANT) or next(iter(variants.values()))
    output = {
        "shift": default["shift"],
        "summary": default["summary"],
        "variants": {k: v["summary"] for k, v in variants.items()},
        "seconds": timings,
    }
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "shift.json").write_text(
        json.dumps(variants | {"seconds": timings}, indent=1)
    )
    if args.json:
        print(json.dumps(output, indent=1))


if __name__ == "__main__":
    main()
