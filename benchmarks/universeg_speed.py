"""How fast UniverSeg segments queries here, next to a plain convolution's speed.

For each support size S, one support set segments a batch of queries through
:class:`~spe.segmenters.universeg.UniverSegSegmenter` (support encoding
included), and the throughput is reported in queries per second and in GMAC/s.
Two MAC counts are given:

- naive: what the official network computes, every cross convolution once per
  (query, support member) pair (about 5.2 GMAC per pair plus 1.6 per query at
  128 x 128);
- executed: what this implementation computes after splitting each cross
  convolution into a query term (once per query) and a support term (once per
  pair), with the first block's support terms once per support member.

The practical ceiling is a plain ``Conv2d(128, 64, 3, padding=1)`` at 128 x 128
in the same layout and precision: the support half of the last decoder block's
cross convolution, the largest share of the executed work. It is measured
right before each row, so that both feel the same machine load.

Run from the repository root::

    python benchmarks/universeg_speed.py [--device cuda] [--autocast bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from _report import machine_line, write_section

from spe.errors import SPEError
from spe.segmenters.base import PreparedImages
from spe.segmenters.universeg import (
    AUTOCAST_DTYPES,
    DECODER_BLOCKS,
    ENCODER_BLOCKS,
    FIRST_QUERY_CHANNELS,
    FIRST_SUPPORT_CHANNELS,
    OFFICIAL_IMAGE_SIZE,
    WIDTH,
    UniverSegNet,
    UniverSegSegmenter,
)
from spe.weights import resolve_weights

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN_WEIGHTS = SHARED / "fixtures" / "universeg" / "universeg_golden_weights.pt"

# The ceiling convolution: input channels, output channels, batch.
CEILING_SHAPE = (2 * WIDTH, WIDTH, 16)


# ---------------------------------------------------------------------------
# Counting multiply-accumulates


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one UniverSeg pass, split by what they scale with.

    Attributes:
        per_pair: MACs per (query, support member) pair.
        per_query: MACs per query, whatever the support size.
        per_member: MACs per support member, shared by all queries.
    """

    per_pair: int
    per_query: int
    per_member: int

    def per_query_with(self, members: int, queries: int) -> float:
        """MACs per query when ``queries`` queries share ``members`` members."""
        shared = self.per_member * members / queries
        return self.per_pair * members + self.per_query + shared


def block_shapes(size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(pixels, query channels, support channels) of each cross block in order."""
    height, width = size
    shapes = [(height * width, FIRST_QUERY_CHANNELS, FIRST_SUPPORT_CHANNELS)]
    for level in range(1, ENCODER_BLOCKS):
        shapes.append((height * width >> (2 * level), WIDTH, WIDTH))
    for level in reversed(range(DECODER_BLOCKS)):
        shapes.append((height * width >> (2 * level), 2 * WIDTH, 2 * WIDTH))
    return shapes


def naive_macs(size: tuple[int, int]) -> MacCount:
    """What the official network computes at ``size``."""
    per_pair = per_query = 0
    for pixels, query_channels, support_channels in block_shapes(size):
        cross = (query_channels + support_channels) * WIDTH * 9 * pixels
        per_pair += cross + WIDTH * WIDTH * 9 * pixels
        per_query += WIDTH * WIDTH * 9 * pixels
    per_query += WIDTH * size[0] * size[1]
    return MacCount(per_pair=per_pair, per_query=per_query, per_member=0)


def executed_macs(size: tuple[int, int]) -> MacCount:
    """What this implementation computes at ``size`` for a shared support set."""
    (first_pixels, first_query, first_support), *rest = block_shapes(size)
    square = WIDTH * WIDTH * 9

    # First block: support terms per member, query terms and the query's share
    # of the support convolution per query, nothing per pair.
    per_member = (first_support * WIDTH * 9 + square) * first_pixels
    per_query = (first_query * WIDTH * 9 + 2 * square) * first_pixels
    per_pair = 0
    for pixels, query_channels, support_channels in rest:
        per_query += (query_channels * WIDTH * 9 + square) * pixels
        per_pair += (support_channels * WIDTH * 9 + square) * pixels
    per_query += WIDTH * size[0] * size[1]
    return MacCount(per_pair=per_pair, per_query=per_query, per_member=per_member)


# ---------------------------------------------------------------------------
# Timing


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(
    run: Callable[[], object],
    device: torch.device,
    repeats: int,
    *,
    warm_up: Callable[[], object] | None = None,
) -> float:
    """The fastest of ``repeats`` timed runs, after one untimed warm-up run.

    ``warm_up`` (default ``run``) may be a smaller run: it only has to load
    the kernels; a run's first-time set-up for new shapes is left to the
    repeats, of which the fastest counts.
    """
    (warm_up or run)()
    synchronise(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        synchronise(device)
        best = min(best, time.perf_counter() - started)
    return best


def autocast_context(device: torch.device, autocast: str | None):
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[autocast])


def ceiling_gmac_per_s(
    device: torch.device, autocast: str | None, repeats: int
) -> float:
    """GMAC/s of one plain Conv2d of the dominant shape, channels-last."""
    in_channels, out_channels, batch = CEILING_SHAPE
    height, width = OFFICIAL_IMAGE_SIZE
    conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
    conv = conv.to(device, memory_format=torch.channels_last).eval()
    maps = torch.rand(batch, in_channels, height, width, device=device)
    maps = maps.contiguous(memory_format=torch.channels_last)

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast_context(device, autocast):
            return conv(maps)

    seconds = best_seconds(run, device, repeats)
    macs = in_channels * out_channels * 9 * height * width * batch
    return macs / seconds / 1e9


@contextlib.contextmanager
def weights_for_benchmark(explicit: str | None) -> Iterator[tuple[Path, str]]:
    """The weights file to time with, and a note on which weights they are."""
    try:
        official = resolve_weights(explicit)
    except SPEError:
        if explicit is not None:
            raise
        official = None

    if official is not None:
        yield official, "the official UniverSeg weights"
    elif GOLDEN_WEIGHTS.is_file():
        yield (
            GOLDEN_WEIGHTS,
            (
                "random weights (the golden test fixture), as the official weights "
                "are not on this machine; speed does not depend on the weight values"
            ),
        )
    else:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "random_universeg.pt"
            torch.save(UniverSegNet().state_dict(), path)
            yield (
                path,
                (
                    "randomly initialised weights, as the official weights are not on "
                    "this machine; speed does not depend on the weight values"
                ),
            )


def random_inputs(
    members: int, queries: int, size: tuple[int, int]
) -> tuple[PreparedImages, torch.Tensor, PreparedImages]:
    """Prepared support images, binary masks and queries of random content."""
    generator = torch.Generator().manual_seed(0)
    support = torch.rand(members, 1, *size, generator=generator)
    masks = (torch.rand(members, 1, *size, generator=generator) > 0.5).float()
    query = torch.rand(queries, 1, *size, generator=generator)
    return (
        PreparedImages(pixels=support, sizes=[size] * members),
        masks,
        PreparedImages(pixels=query, sizes=[size] * queries),
    )


# ---------------------------------------------------------------------------
# The report


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), default=None)
    parser.add_argument("--support-sizes", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--queries", type=int, default=8, help="queries per run")
    parser.add_argument("--batch-size", type=int, default=8, help="queries per pass")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row")
    parser.add_argument("--weights", default=None, help="the official weights file")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave docs/ alone"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    size = OFFICIAL_IMAGE_SIZE
    naive = naive_macs(size)
    executed = executed_macs(size)
    load_before = os.getloadavg()[0]

    rows = []
    with weights_for_benchmark(arguments.weights) as (weights_path, weights_note):
        for members in arguments.support_sizes:
            segmenter = UniverSegSegmenter(
                weights=weights_path,
                device=arguments.device,
                autocast=arguments.autocast,
                support_size=members,
                batch_size=arguments.batch_size,
            )
            device = segmenter.device
            support, masks, queries = random_inputs(members, arguments.queries, size)
            ceiling = ceiling_gmac_per_s(device, arguments.autocast, arguments.repeats)

            run = functools.partial(segmenter.segment_prepared, support, masks, queries)
            warm_up = functools.partial(
                segmenter.segment_prepared, support, masks, queries.subset([0])
            )
            seconds = best_seconds(run, device, arguments.repeats, warm_up=warm_up)
            per_query = seconds / arguments.queries
            naive_gmac = naive.per_query_with(members, arguments.queries) / 1e9
            executed_gmac = executed.per_query_with(members, arguments.queries) / 1e9
            cells = [
                f"{members}",
                f"{arguments.queries}",
                f"{per_query:.3f}",
                f"{1 / per_query:.2f}",
                f"{naive_gmac:.0f}",
                f"{naive_gmac / per_query:.0f}",
                f"{executed_gmac:.0f}",
                f"{executed_gmac / per_query:.0f}",
                f"{ceiling:.0f}",
                f"{executed_gmac / per_query / ceiling:.0%}",
            ]
            rows.append(f"| {' | '.join(cells)} |")
            print(rows[-1], file=sys.stderr)
    load_after = os.getloadavg()[0]

    precision = f"autocast {arguments.autocast}" if arguments.autocast else "float32"
    if device.type == "cuda":
        device_name = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        device_name = str(device)
    command = "python benchmarks/universeg_speed.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    in_channels, out_channels, batch = CEILING_SHAPE
    busy = max(load_before, load_after) > (os.cpu_count() or 1)
    load_note = (
        " The machine was busy with other jobs (load above its core count), so "
        "every figure, the ceiling included, is below what it gives when idle."
        if busy
        else ""
    )
    markdown = "\n".join(
        [
            "## UniverSeg speed",
            "",
            f"Regenerate: `{command.strip()}`",
            "",
            f"{machine_line()} Device: {device_name}, {precision}, 128 x 128, "
            f"up to {arguments.batch_size} queries per pass, best of "
            f"{arguments.repeats} runs. Load average (1 min) {load_before:.1f} "
            f"before, {load_after:.1f} after.{load_note}",
            "",
            f"Weights: {weights_note}.",
            "",
            "| S | queries | s / query | queries / s | naive GMAC / query | "
            "naive GMAC/s | executed GMAC / query | executed GMAC/s | "
            "conv ceiling GMAC/s | executed / ceiling |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Naive count: the official network's work, "
            f"{naive.per_pair / 1e9:.2f} GMAC per (query, support member) pair "
            f"plus {naive.per_query / 1e9:.2f} GMAC per query. Executed count: "
            f"this implementation's work, {executed.per_pair / 1e9:.2f} GMAC per "
            f"pair plus {executed.per_query / 1e9:.2f} per query plus "
            f"{executed.per_member / 1e9:.2f} per support member (shared by the "
            f"queries). Times include encoding the support set. Ceiling: one "
            f"`Conv2d({in_channels}, {out_channels}, 3, padding=1)` on "
            f"{batch} x {in_channels} x 128 x 128 channels-last inputs, the "
            f"largest share of the executed work, measured before each row.",
        ]
    )
    print(markdown)
    if not arguments.no_write:
        write_section("universeg_speed", markdown)


if __name__ == "__main__":
    main()
