"""Writes one benchmark's section of docs/benchmarks.md, leaving the others alone.

Each benchmark script owns a section between two HTML comment markers, so the
scripts can be rerun in any order and each refreshes only its own table.
"""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

# Benchmarks import this module first: no spinning OpenMP threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

HEADER = """# Benchmarks

Every table below is written by a script under `benchmarks/`; the command that
regenerates it is given with it. Figures are measured, never typed in.
"""


def machine_line() -> str:
    """One line naming the machine a table was measured on."""
    return (
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads."
    )


def write_section(name: str, markdown: str, *, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section ``name`` of ``path`` with ``markdown``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = f"{before}{block}{after}"
    else:
        text = f"{text.rstrip()}\n\n{block}"

    # Write next to the target and rename, so a crash never leaves half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp"
    ) as handle:
        handle.write(text)
    Path(handle.name).replace(path)
