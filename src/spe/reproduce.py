"""The published protocol end to end on a labeled dataset folder.

Given ``train/``, ``test/`` and ``extra_test/`` (each with ``images/`` and
``labels/``): train a UNet on part of train, keep checkpoints along training
and choose ``n_checkpoints`` spread over validation Dice; predict test and
extra_test with each; compute real and pseudo metrics; fit G on test; score
the estimates on extra_test over the checkpoints (Pearson r and MAE), next
to the baselines.
"""

from __future__ import annotations

import io
import logging
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spe.calibration import (
    Calibration,
    LinearMap,
    apply_map,
    clip_metric,
    fit_maps,
    widen_by_disagreement,
)
from spe.cases import CaseSet, load_labeled, resolve_task
from spe.errors import SPEError
from spe.evaluation import foreground_fraction, interval_coverage, score_estimator
from spe.io import encode_mask
from spe.outputs import write_bytes_atomic
from spe.per_image import (
    PER_IMAGE_METRICS,
    PerImageSettings,
    collect_scores,
    estimate_cases,
    evaluate_per_image,
    fit_per_image,
    make_descriptor,
    mean_estimates,
    prepare_per_image_reference,
    real_per_case,
)
from spe.pipeline import (
    PIPELINE_METRICS,
    Settings,
    class_keys,
    compute_pseudo,
    compute_real,
    prepare_references,
    reference_record,
    segmenter_record,
)
from spe.segmenters import InContextSegmenter
from spe.unet import (
    TrainedModel,
    TrainingSettings,
    network_inputs,
    predict,
    train_unet,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "test", "extra_test")


@dataclass
class ReproduceSettings:
    """Settings of a protocol run beyond the reverse step's.

    Attributes:
        n_checkpoints: checkpoints chosen, spread over validation Dice.
        validation_fraction: share of train held out to score checkpoints.
        coverage: coverage of the prediction intervals.
        labels_name: the labels folder of each split (``labels_multiclass``
            for JSRT's lungs and heart).
    """

    n_checkpoints: int = 20
    validation_fraction: float = 0.2
    coverage: float = 0.9
    labels_name: str = "labels"


@dataclass
class DatasetSplits:
    """The labeled splits of a dataset, with train divided for validation."""

    name: str
    fit: CaseSet
    validation: CaseSet
    test: CaseSet
    extra_test: CaseSet
    classes: list[int]


def load_dataset(
    root: Path | str, *, labels_name: str, validation_fraction: float, seed: int
) -> DatasetSplits:
    """Read the three splits and hold out part of train for validation."""
    root = Path(root)
    missing = [split for split in SPLITS if not (root / split).is_dir()]
    if missing:
        message = (
            f"{root}: missing {', '.join(missing)}; a dataset folder holds train/, "
            f"test/ and extra_test/, each with images/ and {labels_name}/"
        )
        raise SPEError(message)
    train, test, extra_test = (
        load_labeled(root / split, labels_name=labels_name) for split in SPLITS
    )
    if not 0 < validation_fraction < 1:
        message = f"validation fraction {validation_fraction} must be between 0 and 1"
        raise SPEError(message)
    n_validation = max(1, round(validation_fraction * len(train)))
    if len(train) - n_validation < 2:
        raise SPEError(
            f"{root / 'train'}: needs at least 3 cases to train and validate"
        )

    rng = np.random.default_rng([seed, 104729])
    order = rng.permutation(len(train))
    held_out = set(order[:n_validation].tolist())
    fit = CaseSet(
        cases=[c for i, c in enumerate(train.cases) if i not in held_out],
        source=str(root / "train"),
    )
    fit.fingerprint = f"{train.fingerprint}-fit{seed}"
    validation = CaseSet(
        cases=[c for i, c in enumerate(train.cases) if i in held_out],
        source=f"{root / 'train'} (validation)",
    )
    classes, _ = resolve_task([train, test, extra_test])
    return DatasetSplits(root.name, fit, validation, test, extra_test, classes)


def choose_checkpoints(validation_dice: Sequence[float], n: int) -> list[int]:
    """Indices of ``n`` checkpoints spread evenly over validation Dice.

    The published protocol keeps every k-th checkpoint by validation rank;
    here the spread is over the Dice values themselves (the checkpoint
    nearest to each of ``n`` evenly spaced targets between the worst and the
    best), so that a run of near-identical early models does not crowd out
    the middle of the quality range.
    """
    dice = np.asarray(validation_dice, dtype=np.float64)
    if len(dice) <= n:
        return list(range(len(dice)))
    chosen: list[int] = []
    for target in np.linspace(dice.min(), dice.max(), n):
        distance = np.abs(dice - target)
        distance[chosen] = np.inf
        chosen.append(int(np.argmin(distance)))
    return sorted(chosen)


@dataclass
class CheckpointRecord:
    """Everything measured for one checkpoint."""

    name: str
    step: int
    validation: dict[str, dict[str, float]]
    real: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    pseudo: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    area: dict[str, dict[str, float]] = field(default_factory=dict)
    predictions: dict[str, dict[str, np.ndarray]] = field(
        default_factory=dict, repr=False
    )


@dataclass
class ProtocolRun:
    """The model side of a protocol run, shared by every segmenter evaluated.

    Attributes:
        data: the dataset splits.
        model: the trained UNet and its checkpoints.
        records: the chosen checkpoints with their predictions, real metrics
            and foreground fractions (pseudo metrics are per segmenter).
        axis: slice axis of volumes.
        keys: class keys ("1", or labels and "mean").
        timings: seconds per phase.
    """

    data: DatasetSplits
    model: TrainedModel
    records: list[CheckpointRecord]
    axis: int
    keys: list[str]
    timings: dict[str, float]
    training: TrainingSettings
    protocol: ReproduceSettings


def train_and_predict(
    dataset_root: Path | str,
    *,
    settings: Settings,
    training: TrainingSettings,
    protocol: ReproduceSettings,
    progress: Callable | None = None,
) -> ProtocolRun:
    """Train, choose checkpoints over validation Dice, predict test and extra_test."""
    settings.validate()
    wrap = progress or (lambda items, **_: items)
    timings: dict[str, float] = {}

    # 1. Data and the model's checkpoints.
    clock = time.perf_counter()
    data = load_dataset(
        dataset_root,
        labels_name=protocol.labels_name,
        validation_fraction=protocol.validation_fraction,
        seed=settings.seed,
    )
    axis = settings.axis_for(data.fit)
    keys = class_keys(data.classes)
    timings["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    model = train_unet(
        data.fit,
        data.classes,
        training,
        axis=axis,
        progress=lambda items: wrap(items, desc="training UNet"),
    )
    timings["train"] = time.perf_counter() - clock

    # 2. Validation scores of every saved checkpoint; keep n spread over Dice.
    clock = time.perf_counter()
    validation = []
    validation_inputs = network_inputs(model, data.validation)
    for index in wrap(range(len(model.checkpoints)), desc="validating checkpoints"):
        predicted = data.validation.with_masks(
            predict(model, index, data.validation, inputs=validation_inputs),
            "validation",
        )
        validation.append(
            compute_real(predicted, data.validation, data.classes, hd95=settings.hd95)
        )
    chosen = choose_checkpoints(
        [v[keys[-1]]["dice"] for v in validation], protocol.n_checkpoints
    )
    if len(chosen) < 3:
        raise SPEError("fewer than 3 checkpoints were saved; train for more epochs")
    timings["validate"] = time.perf_counter() - clock

    # 3. Predictions and real metrics of every chosen checkpoint on both sets.
    clock = time.perf_counter()
    records = []
    inputs = {
        "test": network_inputs(model, data.test),
        "extra_test": network_inputs(model, data.extra_test),
    }
    for index in wrap(chosen, desc="predicting"):
        record = CheckpointRecord(
            name=f"step{model.steps[index]}",
            step=model.steps[index],
            validation=validation[index],
        )
        for split, truth in (("test", data.test), ("extra_test", data.extra_test)):
            masks = predict(model, index, truth, inputs=inputs[split])
            predicted = truth.with_masks(masks, split)
            record.predictions[split] = {c.case_id: c.mask for c in predicted.cases}
            record.real[split] = compute_real(
                predicted, truth, data.classes, hd95=settings.hd95
            )
            record.area[split] = foreground_fraction(predicted, data.classes)
        records.append(record)
    timings["predict"] = time.perf_counter() - clock
    return ProtocolRun(data, model, records, axis, keys, timings, training, protocol)


def predictions_of(record: CheckpointRecord, split: str, truth: CaseSet) -> CaseSet:
    """The cases of ``truth`` with the checkpoint's predictions as masks."""
    masks = record.predictions[split]
    return truth.with_masks({c.case_id: masks[c.case_id] for c in truth.cases}, split)


def save_predictions(run: ProtocolRun, folder: Path | str) -> Path:
    """Write every chosen checkpoint's masks, ready for ``spe calibrate``.

    Layout: ``folder/<split>/<checkpoint>/<case id>.png`` (``.nii.gz`` with
    the volume's spacing for 3-D cases), for splits test and extra_test, so
    that ``folder/test`` is a ``--predictions`` folder of ``spe calibrate``
    and each ``folder/extra_test/<checkpoint>`` one of ``spe estimate``.
    Label values are the dataset's (1 for a binary task).

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    splits = {"test": run.data.test, "extra_test": run.data.extra_test}
    for record in run.records:
        for split, truth in splits.items():
            target = folder / split / record.name
            for case in truth.cases:
                extension = ".nii.gz" if case.is_volume else ".png"
                data = encode_mask(
                    record.predictions[split][case.case_id], case.spacing, extension
                )
                write_bytes_atomic(target / f"{case.case_id}{extension}", data)
    return folder


def evaluate_segmenter(
    run: ProtocolRun,
    segmenter: InContextSegmenter,
    *,
    settings: Settings,
    progress: Callable | None = None,
    extra_steps: Sequence[Callable[..., dict[str, Any]]] = (),
) -> dict[str, Any]:
    """Pseudo metrics with ``segmenter``, G fitted on test, scored on extra_test.

    Args:
        extra_steps: callables ``step(context) -> {key: value}`` run after the
            dataset-level evaluation, whose results are added to the output
            (the per-image evaluation is one).

    Returns:
        The JSON-ready results of ``results.json``.
    """
    wrap = progress or (lambda items, **_: items)
    data, records = run.data, run.records
    timings = dict(run.timings)
    started = time.perf_counter()

    clock = time.perf_counter()
    reference = prepare_references(segmenter, data.fit, settings, axis=run.axis)
    timings["prepare_reference"] = time.perf_counter() - clock

    clock = time.perf_counter()
    for record in wrap(records, desc=f"pseudo metrics ({segmenter.name})"):
        for split, truth in (("test", data.test), ("extra_test", data.extra_test)):
            record.pseudo[split] = compute_pseudo(
                segmenter,
                reference,
                predictions_of(record, split, truth),
                data.classes,
                settings,
            ).scores
    timings["pseudo"] = time.perf_counter() - clock

    # Fit G on test; estimate extra_test; score against the real values.
    calibration = Calibration.fit(
        [r.pseudo["test"] for r in records],
        [r.real["test"] for r in records],
        [r.name for r in records],
        metrics=PIPELINE_METRICS,
        segmenter=segmenter_record(segmenter),
        settings=settings.as_dict() | {"classes": data.classes},
        reference=reference_record(data.fit),
    )
    evaluation = evaluate_dataset_level(
        records, calibration, run.keys, run.protocol.coverage
    )
    main_key = run.keys[-1]
    results: dict[str, Any] = {
        "dataset": data.name,
        "segmenter": segmenter.name,
        "segmenter_settings": segmenter.settings(),
        "classes": [str(c) for c in data.classes],
        "dataset_level": evaluation["per_class"][main_key],
        "dataset_level_per_class": evaluation["per_class"],
        "baselines": evaluation["baselines"],
        "coverage": evaluation["coverage"],
        "checkpoints": evaluation["table"],
        "settings": settings.as_dict(),
        "training": asdict(run.training),
        "protocol": asdict(run.protocol),
        "n_cases": {
            "reference": len(reference.cases),
            "validation": len(data.validation),
            "test": len(data.test),
            "extra_test": len(data.extra_test),
        },
    }
    context = {
        "data": data,
        "model": run.model,
        "records": records,
        "reference": reference,
        "segmenter": segmenter,
        "settings": settings,
        "protocol": run.protocol,
        "calibration": calibration,
        "keys": run.keys,
        "wrap": wrap,
        "timings": timings,
    }
    for step in extra_steps:
        results |= step(context)
    if results.get("dataset_level_from_images"):
        # The per-image mean is the method's dataset estimate when available;
        # the published pseudo-based one is kept next to it.
        results["dataset_level_published"] = results["dataset_level"]
        results["dataset_level"] = results["dataset_level_from_images"]
        results["method"] = "per-image mean"
    else:
        results["method"] = "pseudo"

    timings["evaluate"] = time.perf_counter() - started
    results["seconds"] = sum(
        timings[name] for name in ("load", "train", "validate", "predict", "evaluate")
    )
    results["timings"] = timings
    results["peak_memory_mb"] = peak_memory_mb()
    results["calibration"] = calibration.to_dict()
    return results


def reproduce(
    dataset_root: Path | str,
    segmenter: InContextSegmenter,
    *,
    settings: Settings,
    training: TrainingSettings,
    protocol: ReproduceSettings,
    progress: Callable | None = None,
    extra_steps: Sequence[Callable[..., dict[str, Any]]] = (),
) -> dict[str, Any]:
    """Run the whole protocol with one segmenter (see :func:`evaluate_segmenter`)."""
    run = train_and_predict(
        dataset_root,
        settings=settings,
        training=training,
        protocol=protocol,
        progress=progress,
    )
    return evaluate_segmenter(
        run, segmenter, settings=settings, progress=progress, extra_steps=extra_steps
    )


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate_dataset_level(
    records: Sequence[CheckpointRecord],
    calibration: Calibration,
    keys: Sequence[str],
    coverage: float,
) -> dict[str, Any]:
    """Scores of the method and the baselines on extra_test, and the table."""
    per_class: dict[str, dict[str, Any]] = {}
    baselines: dict[str, dict[str, Any]] = {"training_score": {}, "prediction_area": {}}
    covered: dict[str, float] = {}
    table = [
        {"name": r.name, "step": r.step, "validation": r.validation} for r in records
    ]
    main_key = keys[-1]
    for key in keys:
        per_class[key] = {}
        for metric in PIPELINE_METRICS:
            linear = calibration.dataset_level[key][metric]
            real = [r.real["extra_test"][key][metric] for r in records]
            estimates = [
                apply_map(
                    linear,
                    metric,
                    r.pseudo["extra_test"][key][metric],
                    coverage=coverage,
                )
                for r in records
            ]
            per_class[key][metric] = score_estimator(
                [e.estimate for e in estimates], real
            ) | {"n_checkpoints": len(records)}
            hit = interval_coverage(
                [e.low for e in estimates], [e.high for e in estimates], real
            )
            per_class[key][metric]["coverage"] = hit

            area_line = LinearMap.fit(
                [r.area["test"][key] for r in records],
                [r.real["test"][key][metric] for r in records],
            )
            area_estimates = [
                clip_metric(metric, area_line.predict(r.area["extra_test"][key]))
                for r in records
            ]
            training = [r.validation[key][metric] for r in records]
            if key == main_key:
                baselines["prediction_area"][metric] = score_estimator(
                    area_estimates, real
                )
                baselines["training_score"][metric] = score_estimator(training, real)
                covered[metric] = hit
            for row, record, est, area_est in zip(
                table, records, estimates, area_estimates, strict=True
            ):
                row.setdefault("classes", {}).setdefault(key, {})[metric] = {
                    "test_real": record.real["test"][key][metric],
                    "test_pseudo": record.pseudo["test"][key][metric],
                    "extra_test_real": record.real["extra_test"][key][metric],
                    "extra_test_pseudo": record.pseudo["extra_test"][key][metric],
                    "estimate": est.estimate,
                    "low": est.low,
                    "high": est.high,
                    "training_score": record.validation[key][metric],
                    "prediction_area": area_est,
                }
    return {
        "per_class": per_class,
        "baselines": baselines,
        "coverage": covered,
        "table": table,
    }


CSV_COLUMNS = (
    "checkpoint",
    "step",
    "class",
    "metric",
    "test_real",
    "test_pseudo",
    "extra_test_real",
    "extra_test_pseudo",
    "estimate",
    "low",
    "high",
    "training_score",
    "prediction_area",
)


def csv_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per checkpoint, class and metric, for ``results.csv``."""
    rows = []
    for row in results["checkpoints"]:
        for key, metrics in row["classes"].items():
            for metric, values in metrics.items():
                rows.append(
                    {
                        "checkpoint": row["name"],
                        "step": row["step"],
                        "class": key,
                        "metric": metric,
                    }
                    | values
                )
    return rows


def plot_scatter(results: dict[str, Any], folder: Path) -> list[Path]:
    """One PNG per metric: real against pseudo, test and extra_test, with G."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    keys = list(results["checkpoints"][0]["classes"])
    calibration = results["calibration"]["dataset_level"]
    for metric in PIPELINE_METRICS:
        figure, axes = plt.subplots(
            1, len(keys), figsize=(4.2 * len(keys), 4), squeeze=False
        )
        for axis, key in zip(axes[0], keys, strict=True):
            values = [row["classes"][key][metric] for row in results["checkpoints"]]
            for split, colour in (("test", "tab:blue"), ("extra_test", "tab:orange")):
                axis.scatter(
                    [v[f"{split}_pseudo"] for v in values],
                    [v[f"{split}_real"] for v in values],
                    s=18,
                    color=colour,
                    label=split,
                )
            line = calibration[key][metric]
            xs = np.linspace(line["pseudo_min"], line["pseudo_max"], 20)
            axis.plot(
                xs,
                line["slope"] * xs + line["intercept"],
                color="black",
                lw=1,
                label="G (fitted on test)",
            )
            axis.set_xlabel(f"pseudo {metric}")
            axis.set_ylabel(f"real {metric}")
            axis.set_title(f"{results['dataset']} class {key}")
            axis.legend(fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        paths.append(
            write_bytes_atomic(folder / f"scatter_{metric}.png", buffer.getvalue())
        )
    return paths


# ---------------------------------------------------------------------------
# Per-image evaluation, run inside the protocol


def spread_indices(n: int, count: int) -> list[int]:
    """``count`` indices spread evenly over range(n) (all when n <= count)."""
    if n <= count:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, count).round().astype(int).tolist()))


def subsample_cases(cases: CaseSet, max_cases: int | None, seed: int) -> CaseSet:
    """At most ``max_cases`` cases, drawn with ``seed``, in case order."""
    if max_cases is None or len(cases) <= max_cases:
        return cases
    rng = np.random.default_rng([seed, 2718])
    chosen = sorted(rng.choice(len(cases), size=max_cases, replace=False).tolist())
    return CaseSet(cases=[cases.cases[i] for i in chosen], source=cases.source)


def per_image_step(
    settings: PerImageSettings,
    *,
    n_checkpoints: int | None = None,
    max_cases: int | None = None,
    flag_threshold: float = 0.7,
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A reproduce step: per-image calibration on test, evaluation on extra_test.

    It also makes the dataset estimate from per-image ones (a line from the
    mean per-image estimate to the real mean, fitted on test) and scores it on
    extra_test as ``dataset_level_from_images``.

    Args:
        settings: k, aggregate and descriptor of per-image estimation.
        n_checkpoints: checkpoints used (spread over the chosen ones; None:
            all of them).
        max_cases: most cases per split (drawn with the seed); the dataset
            estimate from images is then scored against the real mean of the
            same cases.
    """

    def step(context: dict[str, Any]) -> dict[str, Any]:
        data, records = context["data"], context["records"]
        segmenter, pipeline = context["segmenter"], context["settings"]
        coverage = context["protocol"].coverage
        if data.fit.is_volume:
            logger.info("per-image evaluation skipped: it needs 2-D images")
            return {"per_image": None}

        clock = time.perf_counter()
        descriptor = make_descriptor(settings.descriptor)
        reference = prepare_per_image_reference(
            segmenter, data.fit, descriptor, intensity=pipeline.intensity
        )
        count = len(records) if n_checkpoints is None else n_checkpoints
        chosen = [records[i] for i in spread_indices(len(records), count)]
        splits = {
            split: subsample_cases(getattr(data, split), max_cases, pipeline.seed)
            for split in ("test", "extra_test")
        }

        scores: dict[str, list] = {"test": [], "extra_test": []}
        real: dict[str, list] = {"test": [], "extra_test": []}
        n_targets = 0
        for record in context["wrap"](chosen, desc="per-image checkpoints"):
            for split, truth in splits.items():
                predicted = predictions_of(record, split, truth)
                scores[split].append(
                    collect_scores(
                        segmenter,
                        reference,
                        predicted,
                        data.classes,
                        settings,
                        threshold=pipeline.threshold,
                        hd95=pipeline.hd95,
                    )
                )
                real[split].append(
                    real_per_case(predicted, truth, data.classes, hd95=pipeline.hd95)
                )
                n_targets += len(truth)
        seconds = time.perf_counter() - clock

        record = fit_per_image(
            scores["test"],
            real["test"],
            splits["test"].case_ids,
            settings,
            seed=pipeline.seed,
        )
        rows = {
            split: [
                estimate_cases(
                    record,
                    class_scores,
                    splits[split].case_ids,
                    coverage=coverage,
                    flag_threshold=flag_threshold,
                )
                for class_scores in scores[split]
            ]
            for split in ("test", "extra_test")
        }

        # Per image, over every extra_test case and checkpoint. Rows come per
        # model, then per class; regroup them per class so they line up with
        # the stacked real values.
        stacked_real = {
            key: np.concatenate([r[key] for r in real["extra_test"]])
            for key in real["extra_test"][0]
        }
        flat = [row for model_rows in rows["extra_test"] for row in model_rows]
        ordered = [row for key in stacked_real for row in flat if row["class"] == key]
        evaluation = evaluate_per_image(ordered, stacked_real)

        # The dataset estimate from per-image ones, fitted on test.
        means = {split: [mean_estimates(r) for r in rows[split]] for split in rows}
        real_means = {
            split: [class_means(r, data.classes) for r in real[split]] for split in real
        }
        names = [r.name for r in chosen]
        context["timings"]["per_image"] = seconds
        settings_record = record["settings"] | {
            "n_checkpoints": len(chosen),
            "n_cases": {s: len(c) for s, c in splits.items()},
            "seconds_per_target_image": seconds / max(n_targets, 1),
        }
        try:
            maps, _ = fit_maps(
                means["test"], real_means["test"], names, PIPELINE_METRICS
            )
        except SPEError as error:
            logger.warning("no dataset estimate from per-image ones: %s", error)
            return {"per_image": evaluation, "per_image_settings": settings_record}
        main_key = context["keys"][-1]
        calibration = context["calibration"]
        from_images = {}
        for metric in PIPELINE_METRICS:
            estimates = [
                widen_by_disagreement(
                    apply_map(
                        maps[main_key][metric],
                        metric,
                        m[main_key][metric],
                        coverage=coverage,
                    ).as_dict(),
                    apply_map(
                        calibration.dataset_level[main_key][metric],
                        metric,
                        checkpoint.pseudo["extra_test"][main_key][metric],
                        coverage=coverage,
                    ).as_dict(),
                    metric,
                )
                for m, checkpoint in zip(means["extra_test"], chosen, strict=True)
            ]
            truth = [r[main_key][metric] for r in real_means["extra_test"]]
            from_images[metric] = score_estimator(
                [e["estimate"] for e in estimates], truth
            ) | {
                "n_checkpoints": len(chosen),
                "coverage": interval_coverage(
                    [e["low"] for e in estimates], [e["high"] for e in estimates], truth
                ),
            }
        return {
            "per_image": evaluation,
            "dataset_level_from_images": from_images,
            "per_image_settings": settings_record,
        }

    return step


def class_means(
    per_case: dict[str, np.ndarray], classes: Sequence[int]
) -> dict[str, dict[str, float]]:
    """Class key -> metric -> mean over cases of (n_cases, M) real values."""
    means = {
        key: dict(zip(PER_IMAGE_METRICS, values.mean(axis=0).tolist(), strict=True))
        for key, values in per_case.items()
    }
    if len(classes) > 1:
        means["mean"] = {
            metric: float(np.mean([means[str(c)][metric] for c in classes]))
            for metric in PER_IMAGE_METRICS
        }
    return means
