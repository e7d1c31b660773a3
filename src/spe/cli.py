"""The ``spe`` command line: results on stdout, logs and progress on stderr.

Every user error becomes one line on stderr and exit code 2; an unexpected
failure becomes one line and exit code 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from spe import __version__
from spe.errors import SPEError

# OpenMP threads that spin while waiting slow every torch call many times over
# when other processes share the cores; passive waiting costs little when
# they don't. Set before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

logger = logging.getLogger("spe")


# ---------------------------------------------------------------------------
# Shared option parsing


def parse_spacing(text: str | None) -> tuple[float, ...] | None:
    """'2.5,0.8,0.8' -> (2.5, 0.8, 0.8) in array axis order (mm)."""
    if text is None:
        return None
    try:
        spacing = tuple(float(part) for part in text.split(","))
    except ValueError as error:
        message = f"--spacing {text!r}: give numbers in mm separated by commas"
        raise SPEError(message) from error
    from spe.io import check_spacing

    return check_spacing(spacing, "--spacing")


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table with right-aligned columns."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [
        max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
        for i, h in enumerate(header)
    ]
    lines = ["  ".join(str(h).rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += [
        "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# spe metrics


def run_metrics(args: argparse.Namespace) -> int:
    from spe import io
    from spe.metrics import METRIC_NAMES
    from spe.outputs import dumps_json, write_csv_atomic, write_json_atomic
    from spe.scoring import (
        PER_CASE_COLUMNS,
        parse_classes,
        per_case_rows,
        score_folders,
        summarize,
    )

    if args.spacing and args.spacing_csv:
        raise SPEError("give --spacing or --spacing-csv, not both")
    spacing_table = (
        io.read_spacing_table(args.spacing_csv) if args.spacing_csv else None
    )
    cases, classes = score_folders(
        args.predictions,
        args.labels,
        classes=parse_classes(args.classes),
        hd95=args.hd95,
        spacing=parse_spacing(args.spacing),
        spacing_table=spacing_table,
        progress=not args.quiet,
    )
    summary = summarize(cases, classes, hd95=args.hd95)

    if args.out is not None:
        write_csv_atomic(
            args.out / "per_case.csv", per_case_rows(cases), PER_CASE_COLUMNS
        )
        write_json_atomic(args.out / "summary.json", summary)
        logger.info(
            "wrote %s and %s", args.out / "per_case.csv", args.out / "summary.json"
        )

    if args.json:
        sys.stdout.write(dumps_json(summary))
        return 0
    rows = [
        [label, *(summary["mean"][label][name] for name in METRIC_NAMES)]
        for label in summary["classes"]
    ]
    print(
        f"{summary['n_cases']} cases; HD95 and ASSD in mm, or pixels where files "
        f"have no spacing ({args.hd95} variant)"
    )
    print(format_table(["class", *METRIC_NAMES], rows))
    for label, count in summary["n_infinite_distance"].items():
        if count:
            print(
                f"class {label}: {count} case(s) with one mask empty; their infinite "
                f"distances count as the image diagonal in the means"
            )
    return 0


def add_metrics_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "metrics",
        help="score predicted masks against ground truth",
        description=(
            "Dice, Jaccard, precision, recall, pixel Pearson, HD95 and ASSD per case "
            "and class; writes per_case.csv and summary.json to --out."
        ),
    )
    parser.add_argument(
        "--predictions", type=Path, required=True, help="folder of masks"
    )
    parser.add_argument("--labels", type=Path, required=True, help="ground-truth masks")
    parser.add_argument(
        "--classes", help="class labels to score, e.g. 1,2 (default: found in labels)"
    )
    parser.add_argument(
        "--hd95",
        choices=("max", "union"),
        default="max",
        help="max of the two directed 95th percentiles (default) or pooled",
    )
    parser.add_argument(
        "--spacing", help="pixel size in mm per array axis, e.g. 2.5,0.8,0.8 (Z,Y,X)"
    )
    parser.add_argument(
        "--spacing-csv", type=Path, help="per-case spacing: case_id,<mm> columns"
    )
    parser.add_argument(
        "--out", type=Path, help="folder for per_case.csv, summary.json"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(
        handler=run_metrics,
        output_kind="folder",
        output_names=("per_case.csv", "summary.json"),
    )


# ---------------------------------------------------------------------------
# Options shared by the commands that segment


def add_segmenter_options(
    parser: argparse.ArgumentParser, *, default: str = "auto", calibrated: bool = False
) -> None:
    """Segmenter options; ``calibrated``: auto means the calibration's segmenter."""
    from spe.segmenters import SEGMENTER_NAMES

    group = parser.add_argument_group("in-context segmenter")
    auto = (
        "auto: the one the calibration was made with"
        if calibrated
        else "auto: universeg when its weights are found, else the weight-free "
        f"{DEFAULT_WEIGHT_FREE!r}"
    )
    group.add_argument(
        "--segmenter", choices=("auto", *SEGMENTER_NAMES), default=default, help=auto
    )
    group.add_argument(
        "--universeg-weights", type=Path, help="the official UniverSeg weights file"
    )
    group.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "auto"),
        help="where UniverSeg runs (cpu; auto: CUDA when available)",
    )
    group.add_argument("--seed", type=int, default=0, help="seeds every random draw")


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    from spe.intensity import INTENSITY_MODES
    from spe.pipeline import Settings

    defaults = Settings()
    group = parser.add_argument_group("reverse segmentation")
    group.add_argument(
        "--min-area",
        type=int,
        default=defaults.min_area,
        help="least predicted pixels of a support candidate (10)",
    )
    group.add_argument(
        "--max-support",
        type=int,
        default=defaults.max_support,
        help="most support pairs per class (64)",
    )
    group.add_argument(
        "--repetitions",
        type=int,
        default=defaults.repetitions,
        help="random support draws averaged (1)",
    )
    group.add_argument(
        "--threshold",
        type=number("fraction"),
        default=defaults.threshold,
        help="binarisation threshold (0.5; the published code used 0.4)",
    )
    group.add_argument(
        "--max-references",
        type=int,
        default=defaults.max_references,
        help="most reference cases segmented (default: all)",
    )
    group.add_argument(
        "--hd95",
        choices=("max", "union"),
        default=defaults.hd95,
        help="HD95 variant (max of directed percentiles)",
    )
    group.add_argument(
        "--slice-axis",
        type=int,
        choices=(0, 1, 2),
        help="slice axis of volumes (default: largest spacing)",
    )
    group.add_argument(
        "--intensity",
        choices=INTENSITY_MODES,
        default=None,
        help="intensity standardisation of support and reference images: local "
        "(default for patch and atlas; robust to other scanners and shading), "
        "minmax (as published; default for universeg), equalize",
    )


def pipeline_settings(args: argparse.Namespace, segmenter):
    """The reverse-step settings from the options, for ``segmenter``."""
    from spe.pipeline import Settings

    intensity = args.intensity
    if intensity is None:
        # Limitation: UniverSeg was trained on min-max scaled images, and how
        # it fares on locally standardised ones is unmeasured (its weights are
        # not available here); it keeps its published input by default.
        intensity = "minmax" if segmenter.name == "universeg" else "local"
    return Settings(
        min_area=args.min_area,
        max_support=args.max_support,
        repetitions=args.repetitions,
        threshold=args.threshold,
        max_references=args.max_references,
        seed=args.seed,
        hd95=args.hd95,
        slice_axis=args.slice_axis,
        intensity=intensity,
    ).validate()


# The weight-free segmenter used when UniverSeg's weights are not available.
DEFAULT_WEIGHT_FREE = "patch"


def make_segmenter(args: argparse.Namespace, *, record: dict | None = None):
    """The segmenter the options ask for (or a calibration's, with ``record``)."""
    from spe.segmenters import create_from_record
    from spe.weights import find_weights

    name = args.segmenter
    if name == "auto":
        if record is not None:
            name = record["name"]
        elif find_weights(args.universeg_weights) is not None:
            name = "universeg"
        else:
            name = DEFAULT_WEIGHT_FREE
    runtime = {}
    if name == "universeg":
        runtime = {"weights": args.universeg_weights, "device": args.device}
    settings = {"seed": args.seed}
    if record is not None and record["name"] == name:
        settings = dict(record["settings"])
    return create_from_record(name, settings, **runtime)


def announce_segmenter(segmenter, args: argparse.Namespace) -> None:
    """The first line of every command that segments: which segmenter runs.

    On stdout with the results, or on stderr when stdout carries JSON.
    """
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    print(f"segmenter: {segmenter.name}", file=stream, flush=True)


def progress_bar(args: argparse.Namespace):
    """A function wrapping an iterable in a progress bar on stderr."""
    from tqdm.auto import tqdm

    def wrap(items, **options):
        return tqdm(items, disable=args.quiet, leave=False, file=sys.stderr, **options)

    return wrap


# ---------------------------------------------------------------------------
# spe calibrate


def run_calibrate(args: argparse.Namespace) -> int:
    from spe.cases import load_labeled, read_predictions
    from spe.pipeline import calibrate
    from spe.scoring import parse_classes

    segmenter = make_segmenter(args)
    settings = pipeline_settings(args, segmenter)
    announce_segmenter(segmenter, args)
    reference = load_labeled(args.reference, labels_name=args.labels_name)
    calibration_set = load_labeled(args.calibration, labels_name=args.labels_name)

    folders = (
        sorted(p for p in args.predictions.iterdir() if p.is_dir())
        if (args.predictions.is_dir())
        else []
    )
    if len(folders) < 3:
        message = (
            f"{args.predictions}: needs one subfolder of predicted masks per "
            f"checkpoint or model, at least 3; found {len(folders)}"
        )
        raise SPEError(message)
    predictions = {
        folder.name: read_predictions(folder, calibration_set) for folder in folders
    }
    calibration = calibrate(
        segmenter,
        reference,
        calibration_set,
        predictions,
        settings=settings,
        classes=parse_classes(args.classes),
        per_image=per_image_settings(args) if args.per_image else None,
        progress=lambda items: progress_bar(args)(items, desc="models"),
    )
    calibration.save(args.out)

    # Show the map the estimates will use: from the mean per-image estimate
    # when there is one, else from the pseudo metrics.
    maps, statistic = calibration.dataset_level, "pseudo metric"
    if calibration.from_images is not None:
        maps, statistic = calibration.from_images, "mean per-image estimate"
    rows = [
        [
            key,
            metric,
            fit.slope,
            fit.intercept,
            fit.residual_sd,
            f"[{fit.pseudo_min:.3g}, {fit.pseudo_max:.3g}]",
        ]
        for key in calibration.classes
        for metric, fit in maps[key].items()
    ]
    print(
        f"calibrated on {len(folders)} models x {len(calibration_set)} cases; "
        f"wrote {args.out}"
    )
    print(f"real ~ slope x ({statistic}) + intercept; the range is the one seen:")
    print(
        format_table(
            ["class", "metric", "slope", "intercept", "residual_sd", "range"], rows
        )
    )
    return 0


def add_calibrate_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "calibrate",
        help="fit the map from pseudo to real metrics on a labeled set",
        description=(
            "Fit G per class and metric on a labeled calibration set predicted by "
            "several checkpoints or models; writes a calibration JSON file."
        ),
    )
    parser.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="labeled reference set: images/ and labels/",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        required=True,
        help="labeled calibration set: images/ and labels/",
    )
    parser.add_argument(
        "--predictions",
        type=Path,
        required=True,
        help="one subfolder of predicted masks per checkpoint or model",
    )
    parser.add_argument("--out", type=Path, required=True, help="calibration JSON file")
    parser.add_argument(
        "--labels-name", default="labels", help="name of the labels folder (labels)"
    )
    parser.add_argument("--classes", help="class labels, e.g. 1,2 (default: found)")
    add_segmenter_options(parser)
    add_pipeline_options(parser)
    add_per_image_options(parser)
    parser.set_defaults(handler=run_calibrate, output_kind="file")


# ---------------------------------------------------------------------------
# spe estimate


def estimate_from_args(args: argparse.Namespace, *, labeled: bool = False):
    """Load everything ``spe estimate`` and ``spe evaluate`` need and estimate.

    Returns:
        (the target cases with predictions as masks, the ground truth cases
        or None, the DatasetEstimate, the segmenter, the calibration). For a
        binary task both mask sets are 0/1.
    """
    from spe.calibration import Calibration
    from spe.cases import (
        load_images,
        load_labeled,
        read_predictions,
        resolve_task,
        with_binary_masks,
    )
    from spe.pipeline import estimate, settings_from_calibration

    calibration = Calibration.load(args.calibration)
    settings_from_calibration(calibration)  # a damaged file fails here, early
    segmenter = make_segmenter(args, record=calibration.segmenter)
    announce_segmenter(segmenter, args)
    reference = load_labeled(args.reference, labels_name=args.labels_name)
    truth = None
    if labeled:
        truth = load_labeled(args.target, labels_name=args.labels_name)
        _, classes = settings_from_calibration(calibration)
        _, binary = resolve_task([truth], classes)
        target = truth
    else:
        target = load_images(args.images, matching=args.predictions)
        binary = False  # estimate() decides from the reference labels
    target = with_binary_masks(
        target.with_masks(read_predictions(args.predictions, target), target.source),
        binary,
    )
    result = estimate(
        segmenter,
        calibration,
        reference,
        target,
        coverage=args.coverage,
        flag_metric=args.flag_metric,
        flag_threshold=args.flag_threshold,
        progress=lambda items: progress_bar(args)(items, desc="per-image"),
    )
    return target, truth, result, segmenter, calibration


def estimate_output(args, target, result, segmenter) -> dict:
    """The content of ``estimate.json``."""
    flagged = [row for row in result.per_case if row["flag"] == "below"]
    uncertain = [row for row in result.per_case if row["flag"] == "uncertain"]
    return {
        "segmenter": segmenter.name,
        "calibration": str(args.calibration),
        "n_cases": len(target),
        "coverage": args.coverage,
        "method": result.method,
        "estimates": result.estimates,
        "estimates_from_pseudo": result.published,
        "support": result.pseudo.support,
        "warnings": result.warnings,
        "per_case": {
            "available": bool(result.per_case),
            "flag_metric": args.flag_metric,
            "flag_threshold": args.flag_threshold,
            "n_flagged": len(flagged),
            "flagged": [f"{row['case_id']} (class {row['class']})" for row in flagged],
            "n_uncertain": len(uncertain),
            "note": result.per_case_note,
        },
    }


def write_estimate_files(
    args, output: dict, result, name: str, *, columns: Sequence[str] | None = None
) -> None:
    """``name`` (the JSON summary) and, with per-image estimates, per_case.csv."""
    from spe.outputs import ensure_folder, write_csv_atomic, write_json_atomic
    from spe.per_image import PER_CASE_COLUMNS

    out = ensure_folder(args.out)
    per_case = out / "per_case.csv"
    if result.per_case:
        write_csv_atomic(per_case, result.per_case, columns or PER_CASE_COLUMNS)
    elif per_case.exists():
        # An earlier run's per-case file must not pass for this run's.
        per_case.unlink()
        logger.info("removed %s from an earlier run", per_case)
    write_json_atomic(out / name, output)


def print_estimates(output: dict) -> None:
    from spe.metrics import HIGHER_IS_BETTER

    rows = [
        [
            key,
            metric,
            values["estimate"],
            f"[{values['low']:.4g}, {values['high']:.4g}]",
            "yes" if values["in_calibrated_range"] else "NO",
            output["estimates_from_pseudo"][key][metric]["estimate"],
        ]
        for key, metrics in output["estimates"].items()
        for metric, values in metrics.items()
    ]
    print(
        f"{output['n_cases']} cases; {100 * output['coverage']:.4g}% prediction "
        f"intervals; estimates from the {output['method']}"
    )
    header = ["class", "metric", "estimate", "interval", "in range", "from pseudo"]
    print(format_table(header, rows))
    per_case = output["per_case"]
    if per_case["available"]:
        names = per_case["flagged"]
        shown = ", ".join(names[:10]) + (
            f" and {len(names) - 10} more" if len(names) > 10 else ""
        )
        metric = per_case["flag_metric"]
        side = "below" if HIGHER_IS_BETTER[metric] else "above"
        print(
            f"{per_case['n_flagged']} case(s) with estimated {metric} {side} "
            f"{per_case['flag_threshold']}: {shown or 'none'}; "
            f"{per_case['n_uncertain']} more uncertain (see per_case.csv)"
        )
    elif per_case.get("note"):
        print(per_case["note"])


def run_estimate(args: argparse.Namespace) -> int:
    from spe.outputs import dumps_json

    target, _, result, segmenter, _ = estimate_from_args(args)
    output = estimate_output(args, target, result, segmenter)
    write_estimate_files(args, output, result, "estimate.json")
    if args.json:
        sys.stdout.write(dumps_json(output))
    else:
        print_estimates(output)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from spe.outputs import dumps_json
    from spe.per_image import (
        PER_CASE_COLUMNS,
        PER_IMAGE_METRICS,
        evaluate_per_image,
        real_per_case,
    )
    from spe.pipeline import compute_real, settings_from_calibration

    target, truth, result, segmenter, calibration = estimate_from_args(
        args, labeled=True
    )
    settings, classes = settings_from_calibration(calibration)
    real = compute_real(target, truth, classes, hd95=settings.hd95)
    output = estimate_output(args, target, result, segmenter)
    dataset_level = {}
    for key, metrics in result.estimates.items():
        dataset_level[key] = {
            metric: values
            | {
                "real": real[key][metric],
                "error": values["estimate"] - real[key][metric],
                "inside_interval": values["low"] <= real[key][metric] <= values["high"],
            }
            for metric, values in metrics.items()
        }
    output["dataset_level"] = dataset_level
    columns = None
    if result.per_case:
        per_case_real = real_per_case(target, truth, classes, hd95=settings.hd95)
        output["per_image"] = evaluate_per_image(result.per_case, per_case_real)
        # Each row gains the real values, so wrong estimates can be looked up.
        position = {case.case_id: i for i, case in enumerate(target.cases)}
        for row in result.per_case:
            values = per_case_real[row["class"]][position[row["case_id"]]]
            for metric, value in zip(PER_IMAGE_METRICS, values, strict=True):
                row[f"{metric}_real"] = float(value)
        columns = [*PER_CASE_COLUMNS, *(f"{m}_real" for m in PER_IMAGE_METRICS)]
    write_estimate_files(args, output, result, "evaluation.json", columns=columns)
    if args.json:
        sys.stdout.write(dumps_json(output))
        return 0
    rows = [
        [
            key,
            metric,
            values["estimate"],
            values["real"],
            values["error"],
            "yes" if values["inside_interval"] else "no",
        ]
        for key, metrics in dataset_level.items()
        for metric, values in metrics.items()
    ]
    print(
        format_table(
            ["class", "metric", "estimate", "real", "error", "in interval"], rows
        )
    )
    if "per_image" in output:
        rows = [
            [
                metric,
                values["pearson_r"] if values["pearson_r"] is not None else "n/a",
                values["mae"],
                values["coverage"],
                values["auroc_failure"]
                if values["auroc_failure"] is not None
                else "n/a",
            ]
            for metric, values in output["per_image"].items()
        ]
        print("per image:")
        print(
            format_table(["metric", "r", "MAE", "coverage", "AUROC (Dice<0.7)"], rows)
        )
    return 0


def add_estimate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calibration", type=Path, required=True, help="a file made by spe calibrate"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="the labeled reference set used to calibrate",
    )
    parser.add_argument(
        "--predictions",
        type=Path,
        required=True,
        help="the model's masks for the target images",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--labels-name", default="labels", help="name of the labels folders (labels)"
    )
    parser.add_argument(
        "--coverage",
        type=number("fraction"),
        default=0.9,
        help="prediction interval coverage (0.9)",
    )
    parser.add_argument(
        "--flag-metric",
        default="dice",
        choices=("dice", "jaccard", "precision", "recall", "pearson", "hd95"),
        help="metric whose per-image estimate flags cases (dice)",
    )
    parser.add_argument(
        "--flag-threshold",
        type=number("any"),
        default=0.7,
        help="flag cases estimated worse than this (0.7; for a distance, above)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON to stdout")
    add_segmenter_options(parser, calibrated=True)


def add_evaluate_parser(commands) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="estimate on a labeled target set and score the estimates",
        description=(
            "spe estimate on a target set whose labels are known, then the error "
            "of each estimate, interval coverage and per-image r, MAE and AUROC."
        ),
    )
    parser.add_argument(
        "--target",
        type=Path,
        required=True,
        help="labeled target set: images/ and labels/",
    )
    add_estimate_options(parser)
    parser.set_defaults(
        handler=run_evaluate,
        output_kind="folder",
        output_names=("evaluation.json", "per_case.csv"),
    )


def add_estimate_parser(commands) -> None:
    parser = commands.add_parser(
        "estimate",
        help="estimate metrics of predictions on unlabeled images",
        description=(
            "Estimate Dice, Jaccard, precision, recall, pixel Pearson and HD95 of a "
            "model's predictions without labels, with prediction intervals, per "
            "dataset and per image."
        ),
    )
    parser.add_argument("--images", type=Path, required=True, help="unlabeled images")
    add_estimate_options(parser)
    parser.set_defaults(
        handler=run_estimate,
        output_kind="folder",
        output_names=("estimate.json", "per_case.csv"),
    )


# ---------------------------------------------------------------------------
# spe reproduce and spe demo


def run_reproduce(args: argparse.Namespace) -> int:
    from spe.outputs import (
        dumps_json,
        ensure_folder,
        write_csv_atomic,
        write_json_atomic,
    )
    from spe.reproduce import (
        CSV_COLUMNS,
        ReproduceSettings,
        csv_rows,
        evaluate_segmenter,
        per_image_step,
        plot_scatter,
        save_predictions,
        train_and_predict,
    )
    from spe.unet import TrainingSettings

    segmenter = make_segmenter(args)
    settings = pipeline_settings(args, segmenter)
    announce_segmenter(segmenter, args)
    training = TrainingSettings(
        epochs=args.epochs, width=args.width, image_size=args.image_size, seed=args.seed
    )
    protocol = ReproduceSettings(
        n_checkpoints=args.checkpoints,
        labels_name=args.labels_name,
        coverage=args.coverage,
    )
    out = ensure_folder(args.out)
    # Masks of an earlier run would mix with this run's checkpoints in a
    # --predictions folder, so they are never written over.
    saved = out / "predictions"
    if args.save_predictions and saved.exists() and any(saved.iterdir()):
        message = (
            f"{saved}: holds masks of an earlier run; remove it or choose another --out"
        )
        raise SPEError(message)
    steps = []
    if args.per_image:
        steps.append(
            per_image_step(
                per_image_settings(args),
                n_checkpoints=args.per_image_checkpoints,
                max_cases=args.per_image_max_cases,
                flag_threshold=args.flag_threshold,
            )
        )
    run = train_and_predict(
        args.dataset,
        settings=settings,
        training=training,
        protocol=protocol,
        progress=progress_bar(args),
    )
    if args.save_predictions:
        save_predictions(run, out / "predictions")
    results = evaluate_segmenter(
        run,
        segmenter,
        settings=settings,
        progress=progress_bar(args),
        extra_steps=steps,
    )
    write_json_atomic(out / "results.json", results)
    write_csv_atomic(out / "results.csv", csv_rows(results), CSV_COLUMNS)
    plot_scatter(results, out)

    if args.json:
        sys.stdout.write(
            dumps_json(
                {
                    k: v
                    for k, v in results.items()
                    if k not in ("checkpoints", "calibration")
                }
            )
        )
        return 0
    print(results_table(results))
    saved = " and predictions/" if args.save_predictions else ""
    print(f"wrote results.json, results.csv, scatter plots{saved} to {out}")
    return 0


def results_table(results: dict) -> str:
    """The r/MAE table of a protocol run: method against the baselines."""
    from spe.pipeline import PIPELINE_METRICS

    def number(value):
        return "n/a" if value is None else value

    published = results.get("dataset_level_published")
    rows = []
    for metric in PIPELINE_METRICS:
        method = results["dataset_level"][metric]
        training = results["baselines"]["training_score"][metric]
        area = results["baselines"]["prediction_area"][metric]
        row = [metric, number(method["pearson_r"]), method["mae"], method["coverage"]]
        if published:
            row += [number(published[metric]["pearson_r"]), published[metric]["mae"]]
        row += [
            number(training["pearson_r"]),
            training["mae"],
            number(area["pearson_r"]),
            area["mae"],
        ]
        rows.append(row)
    header = ["metric", "r", "MAE", "coverage"]
    if published:
        header += ["pseudo r", "pseudo MAE"]
    header += ["train r", "train MAE", "area r", "area MAE"]
    title = (
        f"{results['dataset']}: estimates on extra_test over "
        f"{results['dataset_level']['dice']['n_checkpoints']} checkpoints "
        f"({results['segmenter']} segmenter, from the {results['method']}, "
        f"{results['seconds']:.0f} s); next to it: the published estimate from the "
        f"pseudo metrics, and the baselines (training score, prediction area)"
    )
    text = title + "\n" + format_table(header, rows)
    per_image = results.get("per_image")
    if per_image:
        rows = [
            [
                metric,
                number(v["pearson_r"]),
                v["mae"],
                v["coverage"],
                number(v["auroc_failure"]),
            ]
            for metric, v in per_image.items()
        ]
        text += "\nper image (extra_test cases x checkpoints):\n" + format_table(
            ["metric", "r", "MAE", "coverage", "AUROC Dice<0.7"], rows
        )
    return text


def add_reproduce_options(
    parser: argparse.ArgumentParser, *, epochs: int, image_size: int
) -> None:
    group = parser.add_argument_group("protocol")
    group.add_argument(
        "--epochs", type=int, default=epochs, help=f"UNet training epochs ({epochs})"
    )
    group.add_argument("--width", type=int, default=16, help="UNet base width (16)")
    group.add_argument(
        "--image-size",
        type=int,
        default=image_size,
        help=f"UNet input side in pixels ({image_size})",
    )
    group.add_argument(
        "--checkpoints",
        type=int,
        default=20,
        help="checkpoints chosen over validation Dice (20)",
    )
    group.add_argument(
        "--coverage",
        type=number("fraction"),
        default=0.9,
        help="prediction interval coverage (0.9)",
    )
    group.add_argument("--json", action="store_true", help="print JSON to stdout")
    group.add_argument(
        "--save-predictions",
        action="store_true",
        help=(
            "write each checkpoint's masks to OUT/predictions/{test,extra_test}/, "
            "ready for spe calibrate and spe estimate"
        ),
    )
    group.add_argument(
        "--per-image-checkpoints",
        type=int,
        default=None,
        help="checkpoints used for the per-image evaluation (default: all)",
    )
    group.add_argument(
        "--per-image-max-cases",
        type=int,
        default=None,
        help="most cases per split in the per-image evaluation",
    )
    add_per_image_options(parser)


def add_per_image_options(parser: argparse.ArgumentParser) -> None:
    from spe.per_image import AGGREGATES, PerImageSettings

    defaults = PerImageSettings()
    group = parser.add_argument_group("per-image estimates")
    group.add_argument(
        "--per-image",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="estimate each image too (2-D only)",
    )
    group.add_argument(
        "--k",
        type=int,
        default=defaults.k,
        help="similar reference images per target image (8)",
    )
    group.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        default=defaults.aggregate,
        help="topk: regression on the k sorted scores; max: best score",
    )
    group.add_argument(
        "--flag-threshold",
        type=number("any"),
        default=0.7,
        help="flag cases whose estimated Dice is below this (0.7)",
    )


def per_image_settings(args: argparse.Namespace):
    from spe.per_image import PerImageSettings

    return PerImageSettings(k=args.k, aggregate=args.aggregate)


def add_reproduce_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "reproduce",
        help="run the published protocol on a labeled dataset folder",
        description=(
            "Train a UNet on train/, keep checkpoints of varied quality, calibrate "
            "on test/ and score the estimates on extra_test/."
        ),
    )
    parser.add_argument(
        "--dataset",
        type=Path,
        required=True,
        help="folder with train/, test/, extra_test/",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--labels-name", default="labels", help="labels folder of each split (labels)"
    )
    add_reproduce_options(parser, epochs=30, image_size=128)
    add_segmenter_options(parser)
    add_pipeline_options(parser)
    parser.set_defaults(
        handler=run_reproduce,
        output_kind="folder",
        output_names=("results.json", "results.csv"),
    )


def run_demo(args: argparse.Namespace) -> int:
    from importlib import resources

    args.dataset = Path(str(resources.files("spe") / "data" / "jsrt"))
    args.labels_name = "labels"
    return run_reproduce(args)


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="the protocol on the bundled JSRT chest X-rays (heart)",
        description="spe reproduce on the JSRT copy shipped with the package.",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("spe-demo"), help="output folder (spe-demo)"
    )
    add_reproduce_options(parser, epochs=DEMO_EPOCHS, image_size=DEMO_IMAGE_SIZE)
    add_segmenter_options(parser)
    add_pipeline_options(parser)
    parser.set_defaults(
        handler=run_demo,
        max_references=DEMO_MAX_REFERENCES,
        output_kind="folder",
        output_names=("results.json", "results.csv"),
    )


# The demo's budget: under 3 minutes on a 2-core CPU.
DEMO_EPOCHS = 20
DEMO_IMAGE_SIZE = 64
DEMO_MAX_REFERENCES = 48


# ---------------------------------------------------------------------------
# spe weights


def run_weights_info(args: argparse.Namespace) -> int:
    from spe.weights import weights_info

    print(weights_info(args.universeg_weights))
    return 0


def run_weights_download(args: argparse.Namespace) -> int:
    from spe.weights import RELEASE_URL, download_weights

    url = args.url or RELEASE_URL
    print(f"downloading {url}", file=sys.stderr)
    result = download_weights(
        url, args.out, timeout_s=args.timeout, progress=not args.quiet
    )
    print(f"saved {result.path}")
    print(f"size: {result.size_bytes} bytes")
    print(f"sha256: {result.sha256}")
    return 0


def add_weights_parser(commands) -> None:
    parser = commands.add_parser(
        "weights",
        help="find or download UniverSeg's official weights",
        description=(
            "UniverSeg's weights are research-only (OpenRAIL++-M) and never shipped; "
            "they are looked up in --universeg-weights, then $SPE_UNIVERSEG_WEIGHTS, "
            "then the user cache."
        ),
    )
    actions = _CommonOptions(
        parser.add_subparsers(dest="action", metavar="ACTION", required=True),
        parser._common,
    )
    info = actions.add_parser("info", help="where the weights were found, or not")
    info.add_argument("--universeg-weights", type=Path, help="a weights file to check")
    info.set_defaults(handler=run_weights_info)

    download = actions.add_parser(
        "download", help="download the official file into the cache (network)"
    )
    download.add_argument("--url", help="another address to download from")
    download.add_argument(
        "--out", type=Path, help="file or folder (default: the cache)"
    )
    download.add_argument(
        "--timeout",
        type=number("positive"),
        default=15.0,
        help="seconds to wait for the server (15)",
    )
    download.set_defaults(handler=run_weights_download)


# ---------------------------------------------------------------------------
# Entry point


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too, like every other error."""

    def error(self, message: str):
        self.exit(2, f"spe: error: {message} (see {self.prog} --help)\n")


def number(kind: str):
    """An argparse type: a finite float checked by ``kind``.

    Kinds: "positive" (> 0), "fraction" (strictly between 0 and 1), "any".
    """

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from error
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if kind == "positive" and value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
        if kind == "fraction" and not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
        return value

    return convert


def check_outputs(args: argparse.Namespace) -> None:
    """Fail before any work when the results could not be written."""
    from spe.outputs import check_output_file, check_writable

    out = getattr(args, "out", None)
    kind = getattr(args, "output_kind", None)
    if out is None or kind is None:
        return
    if kind == "file":
        check_output_file(out)
    else:
        check_writable(out, args.output_names)


def missing_output_folder(args: argparse.Namespace) -> Path | None:
    """The topmost folder of the output path that does not exist yet, if any."""
    out = getattr(args, "out", None)
    kind = getattr(args, "output_kind", None)
    if out is None or kind is None:
        return None
    folder = Path(out) if kind == "folder" else Path(out).parent
    missing = None
    while not folder.exists() and folder != folder.parent:
        missing, folder = folder, folder.parent
    return missing


def remove_if_empty(folder: Path | None) -> None:
    """Remove a folder this run created, when a failure left no file in it."""
    if folder is None or not folder.is_dir():
        return
    if any(path.is_file() or path.is_symlink() for path in folder.rglob("*")):
        return
    shutil.rmtree(folder)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="spe",
        description=(
            "Estimate a segmentation model's Dice, HD95 and more on unlabeled "
            "images by reverse in-context segmentation."
        ),
    )
    parser.add_argument("--version", action="version", version=f"spe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Every command takes the logging options, after its name.
    common = Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="tracebacks on failure")
    commands = _CommonOptions(commands, common)
    add_metrics_parser(commands)
    add_calibrate_parser(commands)
    add_estimate_parser(commands)
    add_evaluate_parser(commands)
    add_reproduce_parser(commands)
    add_demo_parser(commands)
    add_weights_parser(commands)
    return parser


class _CommonOptions:
    """Wraps the subparsers so that each command inherits the common options."""

    def __init__(self, commands: argparse._SubParsersAction, common) -> None:
        self.commands = commands
        self.common = common

    def add_parser(self, name: str, **options) -> argparse.ArgumentParser:
        parser = self.commands.add_parser(name, parents=[self.common], **options)
        parser._common = self.common  # for commands with actions of their own
        return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as exit:  # usage errors, --help and --version
        return int(exit.code or 0)
    if extras:
        words = ["spe", args.command, getattr(args, "action", None)]
        command = " ".join(word for word in words if word)
        print(
            f"spe: error: {command} does not take {' '.join(extras)} "
            f"(see {command} --help)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.WARNING,
        format="spe: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    # Only the package's own logger gets more verbose; libraries stay quiet.
    if args.debug or args.verbose:
        logger.setLevel(logging.DEBUG if args.debug else logging.INFO)
    created = missing_output_folder(args)
    try:
        check_outputs(args)
        return int(args.handler(args) or 0)
    except SPEError as error:
        remove_if_empty(created)
        print(f"spe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        remove_if_empty(created)
        print("spe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (``spe ... | head``): not an error.
        # Point stdout at nothing so that Python's exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:
        remove_if_empty(created)
        if args.debug:
            traceback.print_exc()
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(
            f"spe: internal error: {type(error).__name__}: {detail} "
            f"(rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
