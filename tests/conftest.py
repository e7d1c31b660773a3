"""Shared test fixtures: where the real datasets live, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

# As the command line does: no spinning OpenMP threads on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

# The shared datasets sit next to the repository, as in CI.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATASETS = SHARED / "datasets"


@pytest.fixture(scope="session")
def datasets() -> Path:
    """The folder of real shared datasets; a missing one fails loudly."""
    if not DATASETS.is_dir():
        pytest.fail(f"the shared datasets are missing at {DATASETS}")
    return DATASETS
