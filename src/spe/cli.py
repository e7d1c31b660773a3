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
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="tracebacks on failure")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_metrics_parser(commands)
    return parser


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
