"""How accurately and how fast each in-context segmenter segments unseen images.

For every task, a fixed random draw of training cases with their ground-truth
masks is the support set, and a fixed random draw of test cases are the
queries. Each segmenter prepares both sets once, segments the queries with
:meth:`~spe.segmenters.base.InContextSegmenter.segment_prepared`, and is
scored by the mean Dice of its probabilities resized back to each query's own
size and binarised at 0.5. Weight-free segmenters always run; UniverSeg runs
when its weights are found.

Run from the repository root::

    python benchmarks/in_context_accuracy.py [--segmenters patch,atlas]
        [--datasets jsrt,hc18] [--seed 0] [--data-root ../shared/datasets]

The table is printed and written to the "in_context_accuracy" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _report import machine_line, write_section
from tqdm import tqdm

from spe.errors import SPEError
from spe.io import open_labeled_folder, read_image, read_mask
from spe.metrics import binary_metrics
from spe.segmenters import SEGMENTER_NAMES, InContextSegmenter, create
from spe.segmenters.base import resize_probabilities

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "datasets"

SUPPORTS = 16
QUERIES = 64
THRESHOLD = 0.5


@dataclass(frozen=True)
class Task:
    """One binary segmentation task of a shared dataset.

    Attributes:
        name: the row label.
        dataset: folder under the data root.
        label: the class scored as foreground; None means any value > 0.
    """

    name: str
    dataset: str
    label: int | None = None


TASKS = {
    "jsrt": [Task("jsrt (heart)", "jsrt")],
    "hc18": [Task("hc18 (fetal head)", "hc18")],
    "kvasir": [Task("kvasir (polyp)", "kvasir")],
    "psfhs": [
        Task("psfhs (pubic symphysis)", "psfhs", label=1),
        Task("psfhs (fetal head)", "psfhs", label=2),
    ],
}


@dataclass
class Cases:
    """Images as stored and their binary masks."""

    images: list[np.ndarray]
    masks: list[np.ndarray]


@dataclass(frozen=True)
class Score:
    """One segmenter on one task.

    Attributes:
        dice: mean Dice over the queries, at each query's own size.
        dice_sd: standard deviation of the per-query Dice.
        seconds_per_query: wall time of ``segment_prepared`` / queries.
        prepare_seconds_per_image: wall time of preparing the supports, their
            masks and the queries / (supports + queries).
    """

    dice: float
    dice_sd: float
    seconds_per_query: float
    prepare_seconds_per_image: float


# ---------------------------------------------------------------------------
# Data


def draw(root: Path, task: Task, split: str, count: int, rng) -> Cases:
    """``count`` cases drawn without replacement (all if the split is smaller)."""
    folder = open_labeled_folder(root / task.dataset / split)
    chosen = rng.choice(len(folder.case_ids), min(count, len(folder.case_ids)), False)
    case_ids = [folder.case_ids[i] for i in sorted(chosen)]
    images = [read_image(folder.images[case]).array for case in case_ids]
    labels = [read_mask(folder.labels[case]).array for case in case_ids]
    masks = [(lab > 0) if task.label is None else (lab == task.label) for lab in labels]
    return Cases(images, masks)


def available_segmenters(requested: list[str] | None) -> list[str]:
    """The segmenters to run: the requested ones, or every one that works here.

    A segmenter that cannot be built (its module missing, or UniverSeg
    without weights) is left out with a note on stderr when it was not asked
    for by name, and is an error when it was.
    """
    names = requested or list(SEGMENTER_NAMES)
    available = []
    for name in names:
        try:
            if name == "universeg":
                from spe.weights import resolve_weights

                resolve_weights()
            create(name)
        except (ImportError, SPEError) as error:
            if requested:
                message = f"segmenter {name!r} cannot run here: {error}"
                raise SPEError(message) from error
            print(f"{name} left out: {error}", file=sys.stderr)
            continue
        available.append(name)
    return available


# ---------------------------------------------------------------------------
# Measurement


def score(segmenter: InContextSegmenter, support: Cases, queries: Cases) -> Score:
    """Segment the queries from the support set; Dice at each query's size."""
    started = time.perf_counter()
    prepared_support = segmenter.prepare(support.images)
    prepared_masks = segmenter.prepare_masks(support.masks)
    prepared_queries = segmenter.prepare(queries.images)
    prepared = time.perf_counter()
    probabilities = segmenter.segment_prepared(
        prepared_support, prepared_masks, prepared_queries
    )
    segmented = time.perf_counter()

    resized = resize_probabilities(probabilities, prepared_queries.sizes)
    dice = [
        binary_metrics(p > THRESHOLD, truth, distances=False)["dice"]
        for p, truth in zip(resized, queries.masks, strict=True)
    ]
    n_images = len(support.images) + len(queries.images)
    return Score(
        dice=float(np.mean(dice)),
        dice_sd=float(np.std(dice)),
        seconds_per_query=(segmented - prepared) / len(queries.images),
        prepare_seconds_per_image=(prepared - started) / n_images,
    )


def markdown(
    results: dict[str, dict[str, Score]],
    segmenters: list[str],
    counts: dict[str, tuple[int, int]],
    arguments: argparse.Namespace,
    load_before: float,
) -> str:
    """The report: settings, the table, and how it was measured."""
    resolutions = ", ".join(
        f"{name} {' x '.join(map(str, create(name).image_size))}" for name in segmenters
    )
    command = "python benchmarks/in_context_accuracy.py"
    if arguments.segmenters:
        command += f" --segmenters {arguments.segmenters}"
    if arguments.datasets:
        command += f" --datasets {arguments.datasets}"
    if arguments.seed:
        command += f" --seed {arguments.seed}"

    lines = [
        "## In-context segmentation accuracy",
        "",
        f"Regenerate: `{command}`",
        "",
        f"Supports: {SUPPORTS} training cases with ground-truth masks; queries: "
        f"{QUERIES} test cases (the whole test split when smaller); drawn with "
        f"seed {arguments.seed}. Working resolution: each segmenter's default "
        f"({resolutions}). Dice is computed at each query's own size, on the "
        f"probabilities resized back and binarised at {THRESHOLD}; mean "
        f"+- standard deviation over the queries. s/query is the wall time of "
        f"`segment_prepared` divided by the number of queries; preparing the "
        f"images (resizing, features) is reported separately, per image.",
        "",
    ]

    header = ["task", "supports / queries"]
    for name in segmenters:
        header += [f"{name} Dice", f"{name} s/query"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for task_name, row in results.items():
        n_support, n_queries = counts[task_name]
        cells = [task_name, f"{n_support} / {n_queries}"]
        for name in segmenters:
            result = row[name]
            cells += [
                f"{result.dice:.3f} +- {result.dice_sd:.3f}",
                f"{result.seconds_per_query:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")

    preparation = []
    for name in segmenters:
        seconds = np.mean(
            [row[name].prepare_seconds_per_image for row in results.values()]
        )
        preparation.append(f"{name} {seconds * 1000:.1f} ms")
    lines += [
        "",
        f"Preparation, mean per image over the tasks: {', '.join(preparation)}.",
        "",
        machine_line() + f" Load average (1 min) before the run: {load_before:.1f}, "
        "from other jobs sharing the CPU; timings are noisy when it is high.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--segmenters",
        help="comma-separated names (default: every one that can run here)",
    )
    parser.add_argument(
        "--datasets", help=f"comma-separated, from {', '.join(TASKS)} (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="draw of the cases")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA,
        help="folder holding the shared datasets (default: ../shared/datasets)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    datasets = arguments.datasets.split(",") if arguments.datasets else list(TASKS)
    unknown = [name for name in datasets if name not in TASKS]
    if unknown:
        message = f"unknown dataset(s) {unknown}; choose from {', '.join(TASKS)}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    requested = arguments.segmenters.split(",") if arguments.segmenters else None
    load_before = os.getloadavg()[0]

    try:
        segmenters = available_segmenters(requested)
        tasks = [task for name in datasets for task in TASKS[name]]
        results: dict[str, dict[str, Score]] = {}
        counts = {}
        progress = tqdm(total=len(tasks) * len(segmenters), desc="segmenting")
        for task in tasks:
            rng = np.random.default_rng(arguments.seed)
            support = draw(arguments.data_root, task, "train", SUPPORTS, rng)
            queries = draw(arguments.data_root, task, "test", QUERIES, rng)
            counts[task.name] = (len(support.images), len(queries.images))
            results[task.name] = {}
            for name in segmenters:
                segmenter = create(name, seed=arguments.seed)
                results[task.name][name] = score(segmenter, support, queries)
                progress.update()
        progress.close()
    except SPEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    report = markdown(results, segmenters, counts, arguments, load_before)
    print(report)
    write_section("in_context_accuracy", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
