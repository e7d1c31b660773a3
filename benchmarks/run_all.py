"""The benchmark table: the published protocol on every shared dataset.

Run: python benchmarks/run_all.py [--datasets jsrt,kvasir] [--segmenters patch,atlas]

For each dataset a child process trains the UNet once, chooses 20
checkpoints, and evaluates the method with every available in-context
segmenter next to the two baselines (the checkpoint's validation score, and a
line from the predicted foreground area). Each child's wall time and peak
memory are measured. The results go to ``benchmarks/results/<dataset>.json``
and the tables to the "protocol" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from _report import machine_line, write_section

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("dice", "jaccard", "precision", "recall", "pearson", "hd95")

# Published averages over six datasets (Zou et al., MICCAI 2025), Dice.
PUBLISHED = {"pearson_r": 0.956, "mae": 0.025}


@dataclass(frozen=True)
class Spec:
    """One benchmark dataset and the settings that bound its cost."""

    name: str
    folder: str
    labels: str = "labels"
    epochs: int = 20
    image_size: int = 64
    max_references: int = 48
    per_image_cases: int = 40
    # The atlas segmenter costs ~10x patch per query: fewer references and
    # per-image cases keep the whole run within the hour.
    atlas_references: int = 24
    atlas_per_image_cases: int = 20


SPECS = {
    spec.name: spec
    for spec in (
        Spec("jsrt", "jsrt"),
        Spec("jsrt-2class", "jsrt", labels="labels_multiclass"),
        Spec("kvasir", "kvasir", epochs=8),
        Spec("hc18", "hc18", epochs=8),
        Spec("psfhs", "psfhs", epochs=10),
        Spec("la3d", "la3d", epochs=8, max_references=4, atlas_references=1),
    )
}


def available_segmenters(requested: list[str] | None) -> list[str]:
    """The segmenters to run: weight-free ones always, UniverSeg with weights."""
    from spe.weights import find_weights

    names = requested or ["patch", "atlas", "universeg"]
    if "universeg" in names and find_weights() is None:
        print("UniverSeg weights not found: universeg skipped", file=sys.stderr)
        names = [n for n in names if n != "universeg"]
    return names


def run_one(spec: Spec, segmenters: list[str], seed: int) -> dict:
    """Inside the child: train once, evaluate every segmenter."""
    from spe.per_image import PerImageSettings
    from spe.pipeline import Settings
    from spe.reproduce import (
        ReproduceSettings,
        evaluate_segmenter,
        per_image_step,
        train_and_predict,
    )
    from spe.segmenters import create
    from spe.unet import TrainingSettings

    settings = Settings(max_references=spec.max_references, seed=seed)
    training = TrainingSettings(
        epochs=spec.epochs, image_size=spec.image_size, seed=seed
    )
    protocol = ReproduceSettings(labels_name=spec.labels)
    started = time.perf_counter()
    run = train_and_predict(
        DATA / spec.folder, settings=settings, training=training, protocol=protocol
    )
    model_seconds = time.perf_counter() - started

    results = {}
    for name in segmenters:
        clock = time.perf_counter()
        atlas = name == "atlas"
        step = per_image_step(
            PerImageSettings(),
            max_cases=spec.atlas_per_image_cases if atlas else spec.per_image_cases,
        )
        references = spec.atlas_references if atlas else spec.max_references
        result = evaluate_segmenter(
            run,
            create(name, seed=seed),
            settings=replace(settings, max_references=references),
            extra_steps=[step],
        )
        result.pop("calibration")
        result["segmenter_seconds"] = time.perf_counter() - clock
        results[name] = result
    return {"spec": spec.__dict__, "model_seconds": model_seconds, "results": results}


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def dataset_markdown(name: str, child: dict) -> str:
    """Tables of one dataset: dataset level, per image, cost."""
    results = child["results"]
    first = next(iter(results.values()))
    spec = child["spec"]
    lines = [
        f"### {name}",
        "",
        f"Classes {', '.join(first['classes'])}; UNet {spec['epochs']} epochs at "
        f"{spec['image_size']} px; 20 checkpoints; references: patch "
        f"{spec['max_references']}, atlas {spec['atlas_references']}; support cap "
        f"64; threshold 0.5; per-image cases per split: patch "
        f"{spec['per_image_cases']}, atlas {spec['atlas_per_image_cases']}; wall "
        f"time {child['wall_seconds']:.0f} s (model {child['model_seconds']:.0f} s), "
        f"peak memory {child['peak_memory_mb']:.0f} MB.",
        "",
        "Dataset level, r / MAE over the checkpoints on extra_test. *image*: the "
        "default estimate for 2-D images (mean of per-image estimates, "
        "calibrated); *pseudo*: the published one (pseudo metrics of the support "
        "set), the default for volumes.",
        "",
    ]
    header = ["metric"]
    for segmenter, result in results.items():
        statistic = "image" if result["method"] == "per-image mean" else "pseudo"
        header.append(f"{segmenter} {statistic}")
        if "dataset_level_published" in result:
            header.append(f"{segmenter} pseudo")
    header += ["train-score", "area", "real range"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for metric in METRICS:
        row = [metric]
        for result in results.values():
            row.append(pair(result["dataset_level"][metric]))
            if "dataset_level_published" in result:
                row.append(pair(result["dataset_level_published"][metric]))
        for baseline in ("training_score", "prediction_area"):
            row.append(pair(first["baselines"][baseline][metric]))
        key = first["classes"][-1] if len(first["classes"]) == 1 else "mean"
        real = [
            c["classes"][key][metric]["extra_test_real"] for c in first["checkpoints"]
        ]
        row.append(f"{min(real):.3g}-{max(real):.3g}")
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "Per image (Dice, extra_test cases x checkpoints):", ""]
    lines += [
        "| segmenter | r | MAE | 90% coverage | AUROC (Dice < 0.7) | s per image |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for segmenter, result in results.items():
        per_image = result.get("per_image")
        if not per_image:
            lines.append(f"| {segmenter} | volumes: not evaluated per image | | | | |")
            continue
        dice = per_image["dice"]
        seconds = result["per_image_settings"]["seconds_per_target_image"]
        lines.append(
            f"| {segmenter} | {fmt(dice['pearson_r'])} | {fmt(dice['mae'])} | "
            f"{fmt(dice['coverage'], 2)} | {fmt(dice['auroc_failure'])} | "
            f"{seconds:.2f} |"
        )
    return "\n".join(lines)


def pair(scores: dict) -> str:
    """'r / MAE' of one estimator."""
    digits = 2 if scores["mae"] >= 1 else 3
    return f"{fmt(scores['pearson_r'])} / {fmt(scores['mae'], digits)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", help="comma-separated, default all")
    parser.add_argument("--segmenters", help="comma-separated, default all available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--report",
        action="store_true",
        help="rewrite the section from benchmarks/results/ without running",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    segmenters = available_segmenters(
        args.segmenters.split(",") if args.segmenters else None
    )

    if args.one:
        import resource

        child = run_one(SPECS[args.one], segmenters, args.seed)
        child["peak_memory_mb"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.one}.json").write_text(json.dumps(child, indent=1))
        return

    names = args.datasets.split(",") if args.datasets else list(SPECS)
    if not args.report:
        for name in names:
            run_child(name, segmenters, args.seed)
    markdown = report()
    write_section("protocol", markdown)
    print(markdown)


def run_child(name: str, segmenters: list[str], seed: int) -> None:
    """One dataset in a child process, its wall time added to its JSON."""
    clock = time.perf_counter()
    command = [
        sys.executable,
        __file__,
        "--one",
        name,
        "--seed",
        str(seed),
        "--segmenters",
        ",".join(segmenters),
    ]
    subprocess.run(command, check=True)
    path = RESULTS / f"{name}.json"
    child = json.loads(path.read_text())
    child["wall_seconds"] = time.perf_counter() - clock
    path.write_text(json.dumps(child, indent=1))
    print(f"{name}: {child['wall_seconds']:.0f} s", file=sys.stderr)


def report() -> str:
    """The protocol section from every dataset's stored results."""
    children = {
        name: json.loads((RESULTS / f"{name}.json").read_text())
        for name in SPECS
        if (RESULTS / f"{name}.json").exists()
    }
    minutes = sum(child["wall_seconds"] for child in children.values()) / 60
    return "\n".join(
        [
            "## The published protocol on every dataset",
            "",
            "`python benchmarks/run_all.py` (all datasets and available segmenters; "
            f"{minutes:.1f} min in all for {', '.join(children)}; "
            "`--report` rewrites this section from `benchmarks/results/`).",
            "",
            "Method: reverse in-context segmentation with G fitted on test over the",
            "checkpoints, scored on extra_test (Pearson r and MAE over checkpoints).",
            "Baselines in the same run: the checkpoint's validation score",
            "(train-score) and a line from the mean predicted foreground fraction",
            "(area). Published averages over six datasets for Dice: r "
            f"{PUBLISHED['pearson_r']}, MAE {PUBLISHED['mae']}. HD95 in mm (pixels",
            "where a dataset has no spacing).",
            "",
            summary_markdown(children),
            "",
            machine_line(),
            "",
            "\n\n".join(
                dataset_markdown(name, child) for name, child in children.items()
            ),
        ]
    )


def summary_markdown(children: dict[str, dict]) -> str:
    """Dice and HD95 of the default estimate per dataset, against the targets."""
    lines = [
        "Summary of the default estimate (targets: Dice r >= 0.97 and MAE <= 0.02; "
        "HD95 MAE within 10% of the real HD95 range over the checkpoints):",
        "",
        "| dataset | segmenter | Dice r / MAE | Dice target | HD95 MAE / 10% of "
        "range | HD95 target | train-score Dice MAE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, child in children.items():
        for segmenter, result in child["results"].items():
            classes = result["classes"]
            key = classes[-1] if len(classes) == 1 else "mean"
            dice = result["dataset_level"]["dice"]
            hd95 = result["dataset_level"]["hd95"]
            real = [
                c["classes"][key]["hd95"]["extra_test_real"]
                for c in result["checkpoints"]
            ]
            dice_met = (dice["pearson_r"] or 0) >= 0.97 and dice["mae"] <= 0.02
            tenth = 0.1 * (max(real) - min(real))
            hd95_met = hd95["mae"] <= tenth
            training = result["baselines"]["training_score"]["dice"]["mae"]
            cells = [
                name,
                segmenter,
                f"{fmt(dice['pearson_r'])} / {fmt(dice['mae'], 4)}",
                "met" if dice_met else "missed",
                f"{hd95['mae']:.2f} / {tenth:.2f}",
                "met" if hd95_met else "missed",
                fmt(training, 4),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
