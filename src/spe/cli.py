"""The ``spe`` command line: results on stdout, logs and progress on stderr.

Every user error becomes one line on stderr and exit code 2; an unexpected
failure becomes one line and exit code 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from spe import __version__
from spe.errors import SPEError

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
    if any(value <= 0 for value in spacing):
        raise SPEError(f"--spacing {text!r}: spacing must be positive (mm)")
    return spacing


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
    print(f"{summary['n_cases']} cases; HD95 and ASSD in mm ({args.hd95} variant)")
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
    parser.set_defaults(handler=run_metrics)


# ---------------------------------------------------------------------------
# Options shared by the commands that segment


def add_segmenter_options(
    parser: argparse.ArgumentParser, *, default: str = "auto"
) -> None:
    from spe.segmenters import SEGMENTER_NAMES

    group = parser.add_argument_group("in-context segmenter")
    group.add_argument(
        "--segmenter",
        choices=("auto", *SEGMENTER_NAMES),
        default=default,
        help="auto: universeg when its weights are found, else the weight-free "
        f"{DEFAULT_WEIGHT_FREE!r}",
    )
    group.add_argument(
        "--universeg-weights", type=Path, help="the official UniverSeg weights file"
    )
    group.add_argument(
        "--device", default="cpu", help="cpu, cuda or auto (UniverSeg only)"
    )
    group.add_argument("--seed", type=int, default=0, help="seeds every random draw")


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
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
        type=float,
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


def pipeline_settings(args: argparse.Namespace):
    from spe.pipeline import Settings

    return Settings(
        min_area=args.min_area,
        max_support=args.max_support,
        repetitions=args.repetitions,
        threshold=args.threshold,
        max_references=args.max_references,
        seed=args.seed,
        hd95=args.hd95,
        slice_axis=args.slice_axis,
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

    settings = pipeline_settings(args)
    segmenter = make_segmenter(args)
    print(f"segmenter: {segmenter.name}", file=sys.stderr)
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
        progress=lambda items: progress_bar(args)(items, desc="models"),
    )
    calibration.save(args.out)

    rows = []
    for key in calibration.classes:
        for metric in calibration.metrics:
            fit = calibration.dataset_level[key][metric]
            rows.append(
                [
                    key,
                    metric,
                    fit.slope,
                    fit.intercept,
                    fit.residual_sd,
                    f"[{fit.pseudo_min:.3g}, {fit.pseudo_max:.3g}]",
                ]
            )
    print(
        f"calibrated on {len(folders)} models x {len(calibration_set)} cases; "
        f"wrote {args.out}"
    )
    print(
        format_table(
            ["class", "metric", "slope", "intercept", "residual_sd", "pseudo range"],
            rows,
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
    parser.set_defaults(handler=run_calibrate)


# ---------------------------------------------------------------------------
# spe estimate


def run_estimate(args: argparse.Namespace) -> int:
    from spe.calibration import Calibration
    from spe.cases import load_images, load_labeled, read_predictions
    from spe.outputs import dumps_json, write_json_atomic
    from spe.pipeline import estimate

    calibration = Calibration.load(args.calibration)
    segmenter = make_segmenter(args, record=calibration.segmenter)
    print(f"segmenter: {segmenter.name}", file=sys.stderr)
    reference = load_labeled(args.reference, labels_name=args.labels_name)
    target = load_images(args.images)
    target = target.with_masks(
        read_predictions(args.predictions, target), "predictions"
    )
    result = estimate(segmenter, calibration, reference, target, coverage=args.coverage)

    output = {
        "segmenter": segmenter.name,
        "calibration": str(args.calibration),
        "n_cases": len(target),
        "coverage": args.coverage,
        "classes": calibration.classes,
        "estimates": result.estimates,
        "support": result.pseudo.support,
        "warnings": result.warnings,
    }
    write_json_atomic(args.out / "estimate.json", output)
    if args.json:
        sys.stdout.write(dumps_json(output))
        return 0
    rows = [
        [
            key,
            metric,
            values["estimate"],
            f"[{values['low']:.4g}, {values['high']:.4g}]",
            values["pseudo"],
            "yes" if values["in_calibrated_range"] else "NO",
        ]
        for key, metrics in result.estimates.items()
        for metric, values in metrics.items()
    ]
    print(f"{len(target)} cases; {round(100 * args.coverage)}% prediction intervals")
    print(
        format_table(
            ["class", "metric", "estimate", "interval", "pseudo", "in range"], rows
        )
    )
    return 0


def add_estimate_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "estimate",
        help="estimate metrics of predictions on unlabeled images",
        description=(
            "Estimate Dice, Jaccard, precision, recall, pixel Pearson and HD95 of a "
            "model's predictions without labels, with prediction intervals."
        ),
    )
    parser.add_argument(
        "--calibration", type=Path, required=True, help="a file made by spe calibrate"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="the labeled reference set used to calibrate",
    )
    parser.add_argument("--images", type=Path, required=True, help="unlabeled images")
    parser.add_argument(
        "--predictions",
        type=Path,
        required=True,
        help="the model's masks for those images",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for estimate.json"
    )
    parser.add_argument(
        "--labels-name",
        default="labels",
        help="name of the reference labels folder (labels)",
    )
    parser.add_argument(
        "--coverage", type=float, default=0.9, help="prediction interval coverage (0.9)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON to stdout")
    add_segmenter_options(parser)
    parser.set_defaults(handler=run_estimate)


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
        plot_scatter,
        reproduce,
    )
    from spe.unet import TrainingSettings

    settings = pipeline_settings(args)
    segmenter = make_segmenter(args)
    print(f"segmenter: {segmenter.name}", file=sys.stderr if args.json else sys.stdout)
    sys.stdout.flush()
    training = TrainingSettings(
        epochs=args.epochs, width=args.width, image_size=args.image_size, seed=args.seed
    )
    protocol = ReproduceSettings(
        n_checkpoints=args.checkpoints,
        labels_name=args.labels_name,
        coverage=args.coverage,
    )
    out = ensure_folder(args.out)
    results = reproduce(
        args.dataset,
        segmenter,
        settings=settings,
        training=training,
        protocol=protocol,
        progress=progress_bar(args),
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
    print(f"wrote results.json, results.csv and scatter plots to {out}")
    return 0


def results_table(results: dict) -> str:
    """The r/MAE table of a protocol run: method against the baselines."""
    from spe.pipeline import PIPELINE_METRICS

    def number(value):
        return "n/a" if value is None else value

    rows = []
    for metric in PIPELINE_METRICS:
        method = results["dataset_level"][metric]
        training = results["baselines"]["training_score"][metric]
        area = results["baselines"]["prediction_area"][metric]
        rows.append(
            [
                metric,
                number(method["pearson_r"]),
                method["mae"],
                method["coverage"],
                number(training["pearson_r"]),
                training["mae"],
                number(area["pearson_r"]),
                area["mae"],
            ]
        )
    header = [
        "metric",
        "r",
        "MAE",
        "coverage",
        "train r",
        "train MAE",
        "area r",
        "area MAE",
    ]
    title = (
        f"{results['dataset']}: estimates on extra_test over "
        f"{results['dataset_level']['dice']['n_checkpoints']} checkpoints "
        f"({results['segmenter']} segmenter, {results['seconds']:.0f} s); "
        f"baselines: training score, prediction area"
    )
    return title + "\n" + format_table(header, rows)


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
        "--coverage", type=float, default=0.9, help="prediction interval coverage (0.9)"
    )
    group.add_argument("--json", action="store_true", help="print JSON to stdout")


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
    parser.set_defaults(handler=run_reproduce)


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
    parser.set_defaults(handler=run_demo, max_references=DEMO_MAX_REFERENCES)


# The demo's budget: under 3 minutes on a 2-core CPU.
DEMO_EPOCHS = 20
DEMO_IMAGE_SIZE = 64
DEMO_MAX_REFERENCES = 48


# ---------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spe",
        description=(
            "Estimate a segmentation model's Dice, HD95 and more on unlabeled "
            "images by reverse in-context segmentation."
        ),
    )
    parser.add_argument("--version", action="version", version=f"spe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Every command takes the logging options, after its name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="tracebacks on failure")
    commands = _CommonOptions(commands, common)
    add_metrics_parser(commands)
    add_calibrate_parser(commands)
    add_estimate_parser(commands)
    add_reproduce_parser(commands)
    add_demo_parser(commands)
    return parser


class _CommonOptions:
    """Wraps the subparsers so that each command inherits the common options."""

    def __init__(self, commands: argparse._SubParsersAction, common) -> None:
        self.commands = commands
        self.common = common

    def add_parser(self, name: str, **options) -> argparse.ArgumentParser:
        return self.commands.add_parser(name, parents=[self.common], **options)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.debug
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="spe: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except SPEError as error:
        print(f"spe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spe: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
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
