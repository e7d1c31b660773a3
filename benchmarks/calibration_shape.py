"""Is a straight line the right calibration map? Linear against local-linear G.

Run: python benchmarks/calibration_shape.py (after benchmarks/run_all.py)

The published method fits G as a straight line from pseudo to real metric
over checkpoints. The in-context segmenter has a ceiling, so pseudo values
flatten as the model nears it, and a line fitted over the whole range of
checkpoints then underestimates the best ones, which are those a user
deploys. This reads the per-checkpoint pseudo and real values that
``run_all.py`` stored in ``benchmarks/results/<dataset>.json`` (the published
statistic, pseudo metrics of the support set), fits G on test and scores it
on extra_test, as a line and as local-linear regression (tricube weights over
the nearest 30% or 50% of checkpoints), and writes the "calibration_shape"
section of docs/benchmarks.md: MAE over the checkpoints, and the error on the
checkpoint with the best real score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from _report import write_section

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = ("jsrt", "jsrt-2class", "kvasir", "hc18", "psfhs", "la3d")
METRICS = ("dice", "hd95")
SPANS = (0.3, 0.5)


def local_linear(x: np.ndarray, y: np.ndarray, at: float, span: float) -> float:
    """Tricube-weighted least-squares line through the points nearest ``at``."""
    nearest = max(3, math.ceil(span * len(x)))
    distance = np.abs(x - at)
    bandwidth = np.sort(distance)[nearest - 1] * (1 + 1e-6) + 1e-12
    weights = np.clip(1 - (distance / bandwidth) ** 3, 0, None) ** 3
    x_mean = np.average(x, weights=weights)
    y_mean = np.average(y, weights=weights)
    spread = np.sum(weights * (x - x_mean) ** 2)
    slope = np.sum(weights * (x - x_mean) * (y - y_mean)) / spread if spread else 0.0
    return float(y_mean + slope * (at - x_mean))


def score(rows: list[dict], metric: str) -> dict[str, tuple[float, float]]:
    """Map name -> (MAE over checkpoints, signed error on the best checkpoint)."""
    test_pseudo = np.array([r["test_pseudo"] for r in rows])
    test_real = np.array([r["test_real"] for r in rows])
    pseudo = np.array([r["extra_test_pseudo"] for r in rows])
    real = np.array([r["extra_test_real"] for r in rows])
    best = int(np.argmin(real) if metric == "hd95" else np.argmax(real))

    slope, intercept = np.polyfit(test_pseudo, test_real, 1)
    estimates = {"line": slope * pseudo + intercept}
    for span in SPANS:
        estimates[f"local {span:.1f}"] = np.array(
            [local_linear(test_pseudo, test_real, p, span) for p in pseudo]
        )
    return {
        name: (float(np.mean(np.abs(e - real))), float(e[best] - real[best]))
        for name, e in estimates.items()
    }


def main() -> None:
    names = ["line", *(f"local {span:.1f}" for span in SPANS)]
    header = ["dataset", "segmenter", "metric"]
    header += [f"{name} MAE / best err" for name in names]
    lines = [
        "## Calibration map: line or local line",
        "",
        "`python benchmarks/calibration_shape.py`, from the per-checkpoint values "
        "stored by `run_all.py` (published statistic: pseudo metrics of the "
        "support set; G fitted on test, scored on extra_test over 20 "
        "checkpoints). *best err*: estimate minus real on the checkpoint with "
        "the best real score. *local s*: local-linear G with tricube weights "
        "over the nearest fraction s of checkpoints.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for dataset in DATASETS:
        path = RESULTS / f"{dataset}.json"
        if not path.exists():
            continue
        child = json.loads(path.read_text())
        for segmenter, result in child["results"].items():
            classes = result["classes"]
            key = classes[-1] if len(classes) == 1 else "mean"
            for metric in METRICS:
                rows = [c["classes"][key][metric] for c in result["checkpoints"]]
                scores = score(rows, metric)
                digits = 2 if metric == "hd95" else 3
                cells = [
                    f"{scores[n][0]:.{digits}f} / {scores[n][1]:+.{digits}f}"
                    for n in names
                ]
                row = [dataset, segmenter, metric, *cells]
                lines.append("| " + " | ".join(row) + " |")
    write_section("calibration_shape", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
