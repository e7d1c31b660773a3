"""How fast the metrics engine scores cases: 2-D masks per second, 3-D pair time.

Run: python benchmarks/metrics_speed.py [--cases 4000]

The 2-D cases are pairs of overlapping ellipses of random size and position on
128 x 128 (the shape of reverse-segmentation outputs); the 3-D case is a pair
of ellipsoids filling much of a 256 x 256 x 128 volume with anisotropic
spacing. Everything runs on one core (NumPy and SciPy do not thread here).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _report import machine_line, write_section

from spe.metrics import binary_metrics


def ellipse_pair(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple:
    """Two overlapping random ellipses (or ellipsoids) as boolean masks."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    masks = []
    centre = np.array([rng.uniform(0.3, 0.7) * n for n in shape])
    radii = np.array([rng.uniform(0.1, 0.3) * n for n in shape])
    for _ in range(2):
        jitter_c = centre + rng.normal(0, 0.03, len(shape)) * np.array(shape)
        jitter_r = radii * rng.uniform(0.85, 1.15, len(shape))
        masks.append(
            sum(
                ((g - c) / r) ** 2
                for g, c, r in zip(grids, jitter_c, jitter_r, strict=True)
            )
            < 1
        )
    return masks[0], masks[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=4000, help="2-D cases to score")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    # 2-D: all metrics, default HD95.
    pairs = [ellipse_pair(rng, (128, 128)) for _ in range(args.cases)]
    start = time.perf_counter()
    for prediction, truth in pairs:
        binary_metrics(prediction, truth)
    per_second_2d = args.cases / (time.perf_counter() - start)

    # 2-D: overlaps only, as the pipeline does when distances are not asked for.
    start = time.perf_counter()
    for prediction, truth in pairs:
        binary_metrics(prediction, truth, distances=False)
    per_second_overlap = args.cases / (time.perf_counter() - start)

    # 3-D: one large pair, best of three runs.
    prediction, truth = ellipse_pair(rng, (128, 256, 256))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        binary_metrics(prediction, truth, spacing=(2.0, 0.8, 0.8))
        times.append(time.perf_counter() - start)

    markdown = "\n".join(
        [
            "## Metrics engine speed",
            "",
            "`python benchmarks/metrics_speed.py` (one core; aims: 2,000 2-D cases/s,",
            "a 3-D pair under 1 s).",
            "",
            "| case | result |",
            "| --- | --- |",
            f"| 128x128, all 7 metrics | {per_second_2d:,.0f} cases/s |",
            f"| 128x128, overlap metrics only | {per_second_overlap:,.0f} cases/s |",
            f"| 128x256x256 volume pair, all metrics | {min(times):.2f} s |",
            "",
            machine_line(),
        ]
    )
    print(markdown)
    write_section("metrics_speed", markdown)


if __name__ == "__main__":
    main()
