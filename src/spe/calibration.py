"""The calibration map G from pseudo to real metrics, and its file format.

G is fitted per class and metric on pairs (pseudo, real) from a labeled
calibration set predicted by several checkpoints or models: a straight line,
as published, with its residual spread, so that an estimate comes with a
prediction interval. The range of pseudo values seen is kept to warn when an
estimate extrapolates.

The JSON file records everything needed to reuse G safely: the segmenter and
its settings, the support and threshold settings, and a fingerprint of the
reference set. Estimating with anything different is an error that says
what differs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from spe import __version__
from spe.errors import SPEError
from spe.metrics import HIGHER_IS_BETTER
from spe.outputs import write_json_atomic

logger = logging.getLogger(__name__)

SCHEMA = "spe.calibration"
SCHEMA_VERSION = 1

# Valid ranges of each metric: estimates and intervals are clipped to them.
METRIC_RANGES = {
    "dice": (0.0, 1.0),
    "jaccard": (0.0, 1.0),
    "precision": (0.0, 1.0),
    "recall": (0.0, 1.0),
    "pearson": (-1.0, 1.0),
    "hd95": (0.0, math.inf),
    "assd": (0.0, math.inf),
}
MIN_POINTS = 3


@dataclass
class LinearMap:
    """real ~ slope * pseudo + intercept, fitted by least squares.

    Attributes:
        slope, intercept: the line.
        residual_sd: residual standard deviation (n - 2 degrees of freedom).
        n_points: pairs fitted.
        pseudo_mean, pseudo_sxx: mean and sum of squared deviations of the
            pseudo values, for the prediction interval.
        pseudo_min, pseudo_max: the range of pseudo values seen.
        real_min, real_max: the range of real values seen.

    Limitation: the in-context segmenter's ceiling bends the pseudo-to-real
    relation near the best checkpoints, and a line fitted over the whole
    range underestimates them (JSRT Dice by about 0.016, HD95 overestimated
    by several mm; docs/benchmarks.md, "Calibration map"). A local-linear
    map halves that error on most 2-D datasets but breaks down where the
    pseudo values are degenerate (la3d with one atlas reference), so it is
    not implemented; the line, as published, is used instead.
    """

    slope: float
    intercept: float
    residual_sd: float
    n_points: int
    pseudo_mean: float
    pseudo_sxx: float
    pseudo_min: float
    pseudo_max: float
    real_min: float
    real_max: float

    @classmethod
    def fit(cls, pseudo: Sequence[float], real: Sequence[float]) -> LinearMap:
        """Least-squares line through (pseudo, real) pairs.

        Raises:
            SPEError: fewer than three pairs, or non-finite values.
        """
        x = np.asarray(pseudo, dtype=np.float64)
        y = np.asarray(real, dtype=np.float64)
        if x.size < MIN_POINTS:
            message = (
                f"calibration needs at least {MIN_POINTS} checkpoints or models, got "
                f"{x.size}; add prediction folders"
            )
            raise SPEError(message)
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise SPEError("calibration values must be finite; check the inputs")

        x_mean = float(x.mean())
        sxx = float(((x - x_mean) ** 2).sum())
        # Pseudo values that do not vary carry no information on the slope;
        # the line is then flat at the mean real value.
        slope = (
            float(((x - x_mean) * (y - y.mean())).sum() / sxx) if sxx > 1e-12 else 0.0
        )
        intercept = float(y.mean() - slope * x_mean)
        residuals = y - (slope * x + intercept)
        dof = max(x.size - 2, 1)
        return cls(
            slope=slope,
            intercept=intercept,
            residual_sd=float(math.sqrt((residuals**2).sum() / dof)),
            n_points=int(x.size),
            pseudo_mean=x_mean,
            pseudo_sxx=sxx,
            pseudo_min=float(x.min()),
            pseudo_max=float(x.max()),
            real_min=float(y.min()),
            real_max=float(y.max()),
        )

    def predict(self, pseudo: float) -> float:
        """The point estimate for a pseudo value (not clipped)."""
        return self.slope * pseudo + self.intercept

    def interval_half_width(self, pseudo: float, coverage: float) -> float:
        """Half width of the prediction interval for a new point at ``pseudo``.

        The classical interval of simple linear regression with Student's t on
        n - 2 degrees of freedom; it widens away from the mean pseudo value.
        """
        dof = max(self.n_points - 2, 1)
        t = float(stats.t.ppf(0.5 + coverage / 2, dof))
        leverage = 1.0 / self.n_points
        if self.pseudo_sxx > 1e-12:
            leverage += (pseudo - self.pseudo_mean) ** 2 / self.pseudo_sxx
        return t * self.residual_sd * math.sqrt(1.0 + leverage)

    def in_range(self, pseudo: float) -> bool:
        """Whether ``pseudo`` lies within the calibrated range (with 1% slack)."""
        slack = 0.01 * max(self.pseudo_max - self.pseudo_min, 1e-9)
        return self.pseudo_min - slack <= pseudo <= self.pseudo_max + slack


def fit_maps(
    statistic: Sequence[Mapping[str, Mapping[str, float]]],
    real: Sequence[Mapping[str, Mapping[str, float]]],
    names: Sequence[str],
    metrics: Sequence[str],
) -> tuple[dict[str, dict[str, LinearMap]], dict[str, dict[str, list[list[Any]]]]]:
    """One line per class and metric from a statistic to the real value.

    Args:
        statistic, real: per model, class key -> metric -> value.
        names: the models, for the record of points.

    Returns:
        (class -> metric -> LinearMap, class -> metric -> [x, y, name] points).
    """
    maps: dict[str, dict[str, LinearMap]] = {}
    points: dict[str, dict[str, list[list[Any]]]] = {}
    for key in statistic[0]:
        maps[key], points[key] = {}, {}
        for metric in metrics:
            xs = [s[key][metric] for s in statistic]
            ys = [r[key][metric] for r in real]
            maps[key][metric] = LinearMap.fit(xs, ys)
            check_spread(xs, ys, key, metric)
            points[key][metric] = [
                [x, y, name] for x, y, name in zip(xs, ys, names, strict=True)
            ]
    return maps, points


def check_spread(
    pseudo: Sequence[float], real: Sequence[float], key: str, metric: str
) -> None:
    """A calibration needs models of different quality: refuse flat Dice.

    When the pseudo or the real Dice does not vary across the models, the
    line carries no information and its intervals would be falsely narrow.
    Other metrics that do not vary only get a warning.
    """
    for name, values in (("pseudo", pseudo), ("real", real)):
        if np.ptp(np.asarray(values, dtype=np.float64)) > 1e-9:
            continue
        message = (
            f"the {name} {metric} of class {key} is the same ({values[0]:.4g}) for "
            f"every model; calibrate with checkpoints or models of clearly "
            f"different quality"
        )
        if name == "pseudo" and values[0] == 0:
            # Usually not a flat model family but a label mismatch.
            message += (
                f", and if no model predicts class {key} at all, check that the "
                f"predictions use the label values of the labels folder"
            )
        if metric == "dice":
            raise SPEError(message)
        logger.warning(message)


def clip_metric(metric: str, value: float) -> float:
    """Clip an estimate to the metric's valid range."""
    low, high = METRIC_RANGES.get(metric, (-math.inf, math.inf))
    return float(min(max(value, low), high))


@dataclass
class Estimate:
    """One calibrated estimate with its prediction interval."""

    estimate: float
    low: float
    high: float
    pseudo: float
    in_calibrated_range: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_map(
    linear: LinearMap, metric: str, pseudo: float, *, coverage: float = 0.9
) -> Estimate:
    """G(pseudo) with its interval, clipped to the metric's range."""
    centre = linear.predict(pseudo)
    half = linear.interval_half_width(pseudo, coverage)
    return Estimate(
        estimate=clip_metric(metric, centre),
        low=clip_metric(metric, centre - half),
        high=clip_metric(metric, centre + half),
        pseudo=float(pseudo),
        in_calibrated_range=linear.in_range(pseudo),
    )


def widen_by_disagreement(
    primary: dict[str, Any], secondary: dict[str, Any], metric: str
) -> dict[str, Any]:
    """The primary estimate with its interval widened by a second estimator.

    Two estimators with different failure modes (the mean of per-image
    estimates, and the pseudo metrics of a large support set) agree on data
    like the calibration set; when new images differ, they drift apart. The
    half width becomes sqrt(h^2 + d^2), with h the primary half width and d
    the difference of the two estimates, so the interval grows where the
    calibration is least trustworthy.

    Args:
        primary, secondary: Estimate dicts (``estimate``, ``low``, ``high``).
    """
    half = (primary["high"] - primary["low"]) / 2
    disagreement = primary["estimate"] - secondary["estimate"]
    widened = math.sqrt(half**2 + disagreement**2)
    return primary | {
        "low": clip_metric(metric, primary["estimate"] - widened),
        "high": clip_metric(metric, primary["estimate"] + widened),
        "disagreement": disagreement,
    }


# ---------------------------------------------------------------------------
# The calibration file


@dataclass
class Calibration:
    """Calibration maps per class and metric, and what they were made with.

    Attributes:
        metrics: the metric names calibrated.
        classes: class keys ("1", "2", ...) plus "mean" (the mean over
            classes) for label maps with several classes.
        segmenter: {"name": ..., "settings": {...}} of the in-context
            segmenter.
        settings: support, threshold and reference settings of the pipeline.
        reference: {"fingerprint": ..., "n_cases": ..., "source": ...}.
        dataset_level: class -> metric -> LinearMap.
        points: class -> metric -> list of [pseudo, real, name] fitted.
        per_image: per-image calibration (see :mod:`spe.per_image`), or None.
        from_images: class -> metric -> LinearMap from the mean of the
            per-image estimates over a set's cases to its real mean: the
            dataset estimate that holds under distribution shift (see
            docs/benchmarks.md); None without per-image calibration.
    """

    metrics: list[str]
    classes: list[str]
    segmenter: dict[str, Any]
    settings: dict[str, Any]
    reference: dict[str, Any]
    dataset_level: dict[str, dict[str, LinearMap]]
    points: dict[str, dict[str, list[list[Any]]]] = field(default_factory=dict)
    per_image: dict[str, Any] | None = None
    from_images: dict[str, dict[str, LinearMap]] | None = None

    @classmethod
    def fit(
        cls,
        pseudo: Sequence[Mapping[str, Mapping[str, float]]],
        real: Sequence[Mapping[str, Mapping[str, float]]],
        names: Sequence[str],
        *,
        metrics: Sequence[str],
        segmenter: dict[str, Any],
        settings: dict[str, Any],
        reference: dict[str, Any],
    ) -> Calibration:
        """Fit one line per class and metric.

        Args:
            pseudo, real: per checkpoint or model, class key -> metric -> value.
            names: the checkpoint or model names, for the record.
        """
        classes = list(pseudo[0])
        dataset_level, points = fit_maps(pseudo, real, names, metrics)
        return cls(
            metrics=list(metrics),
            classes=classes,
            segmenter=segmenter,
            settings=settings,
            reference=reference,
            dataset_level=dataset_level,
            points=points,
        )

    # -- file -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "spe_version": __version__,
            "metrics": self.metrics,
            "classes": self.classes,
            "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in self.metrics},
            "segmenter": self.segmenter,
            "settings": self.settings,
            "reference": self.reference,
            "dataset_level": {
                key: {metric: asdict(fit) for metric, fit in maps.items()}
                for key, maps in self.dataset_level.items()
            },
            "points": self.points,
            "per_image": self.per_image,
            "dataset_level_from_images": None
            if self.from_images is None
            else {
                key: {metric: asdict(fit) for metric, fit in maps.items()}
                for key, maps in self.from_images.items()
            },
        }

    def save(self, path: Path | str) -> Path:
        """Write the calibration as JSON, atomically."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path | str) -> Calibration:
        """Read and validate a calibration file.

        Raises:
            SPEError: the file is missing, not JSON, not a calibration, of
                another schema version, or misses a field.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            message = f"{path}: no such calibration file; make one with spe calibrate"
            raise SPEError(message) from error
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            message = f"{path}: not a readable JSON calibration file ({error})"
            raise SPEError(message) from error
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "calibration") -> Calibration:
        """Validate the structure of a calibration read from JSON."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            message = f"{source}: not an SPE calibration file (no schema {SCHEMA!r})"
            raise SPEError(message)
        if data.get("schema_version") != SCHEMA_VERSION:
            message = (
                f"{source}: calibration schema version {data.get('schema_version')!r} "
                f"is not the supported {SCHEMA_VERSION}; recalibrate with this version"
            )
            raise SPEError(message)
        required = ("metrics", "classes", "segmenter", "settings", "reference")
        missing = [name for name in (*required, "dataset_level") if name not in data]
        if missing:
            raise SPEError(f"{source}: calibration misses {', '.join(missing)}")

        def malformed(what: str) -> SPEError:
            return SPEError(f"{source}: {what} is malformed; recalibrate")

        metrics, classes = data["metrics"], data["classes"]
        if not _is_list_of(metrics, str) or not metrics:
            raise malformed("metrics")
        if any(metric not in METRIC_RANGES for metric in metrics):
            raise malformed("metrics")
        if not _is_list_of(classes, str) or not classes:
            raise malformed("classes")
        segmenter, reference = data["segmenter"], data["reference"]
        if not isinstance(segmenter, dict) or not isinstance(
            segmenter.get("name"), str
        ):
            raise malformed("segmenter")
        if not isinstance(segmenter.get("settings"), dict):
            raise malformed("segmenter settings")
        if not isinstance(data["settings"], dict):
            raise malformed("settings")
        if not isinstance(reference, dict) or not isinstance(
            reference.get("fingerprint"), str
        ):
            raise malformed("reference")
        if not isinstance(data["dataset_level"], dict):
            raise malformed("dataset_level")

        dataset_level = _read_maps(data["dataset_level"], classes, metrics, source)
        from_images = data.get("dataset_level_from_images")
        if from_images is not None:
            if not isinstance(from_images, dict):
                raise malformed("dataset_level_from_images")
            from_images = _read_maps(from_images, classes, metrics, source)
        return cls(
            metrics=list(data["metrics"]),
            classes=list(data["classes"]),
            segmenter=data["segmenter"],
            settings=data["settings"],
            reference=data["reference"],
            dataset_level=dataset_level,
            points=data.get("points") or {},
            per_image=data.get("per_image"),
            from_images=from_images,
        )

    # -- reuse ------------------------------------------------------------------

    def check_compatible(
        self,
        *,
        segmenter: dict[str, Any],
        reference_fingerprint: str,
        reference_source: str = "",
        reference_labels_name: str = "",
    ) -> None:
        """Raise SPEError naming what differs from the calibration's set-up."""
        if segmenter["name"] != self.segmenter["name"]:
            message = (
                f"the calibration was made with the {self.segmenter['name']!r} "
                f"segmenter but this run uses {segmenter['name']!r}; pass --segmenter "
                f"{self.segmenter['name']} or recalibrate"
            )
            raise SPEError(message)
        differences = describe_differences(
            self.segmenter["settings"], segmenter["settings"]
        )
        if differences:
            message = (
                f"segmenter settings differ from the calibration's ({differences}); "
                f"use the same settings or recalibrate"
            )
            raise SPEError(message)
        # Files older than this record have no labels_name: the fingerprint
        # below still tells the sets apart.
        calibrated_labels = self.reference.get("labels_name")
        if (
            calibrated_labels
            and reference_labels_name
            and reference_labels_name != calibrated_labels
        ):
            message = (
                f"the calibration was made with the labels folder "
                f"{calibrated_labels!r} of the reference set, this run uses "
                f"{reference_labels_name!r}; pass --labels-name {calibrated_labels} "
                f"or recalibrate"
            )
            raise SPEError(message)
        if reference_fingerprint != self.reference["fingerprint"]:
            given = f" {reference_source}" if reference_source else ""
            message = (
                f"the images or labels of the reference set{given} differ from those "
                f"calibrated with ({self.reference.get('source')}; fingerprint "
                f"{reference_fingerprint} vs {self.reference['fingerprint']}); use "
                f"the same reference images and labels, or recalibrate"
            )
            raise SPEError(message)


def _read_maps(
    data: dict[str, Any], classes: list[str], metrics: list[str], source: str
) -> dict[str, dict[str, LinearMap]]:
    """class -> metric -> LinearMap from JSON, every field checked."""
    fields = set(LinearMap.__dataclass_fields__)
    maps: dict[str, dict[str, LinearMap]] = {}
    for key in classes:
        per_class = data.get(key)
        if not isinstance(per_class, dict):
            raise SPEError(f"{source}: no calibration for class {key}")
        maps[key] = {}
        for metric in metrics:
            values = per_class.get(metric)
            if (
                not isinstance(values, dict)
                or set(values) != fields
                or not all(_is_finite_number(v) for v in values.values())
                or values["n_points"] < MIN_POINTS
                or values["residual_sd"] < 0
                or values["pseudo_sxx"] < 0
            ):
                message = (
                    f"{source}: calibration of {metric} (class {key}) is malformed; "
                    f"recalibrate"
                )
                raise SPEError(message)
            maps[key][metric] = LinearMap(**values)
    return maps


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(item, kind) for item in value)


def _is_finite_number(value: Any) -> bool:
    """int or float (not bool), finite."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def describe_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> str:
    """'k: a -> b, ...' for the keys whose values differ; '' when equal."""
    keys = sorted(set(expected) | set(actual))
    parts = [
        f"{key}: {expected.get(key)!r} -> {actual.get(key)!r}"
        for key in keys
        if _normalise(expected.get(key)) != _normalise(actual.get(key))
    ]
    return ", ".join(parts)


def _normalise(value: Any) -> Any:
    """Tuples and lists compare equal, as they do after a JSON round trip."""
    if isinstance(value, tuple | list):
        return [_normalise(item) for item in value]
    return value
