"""Shared fixtures for the data tests: small real NIfTI/PNG datasets written to tmp_path."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # lets `pytest tests/data` import amlp_core without an install
    sys.path.insert(0, str(REPO))

from .helpers import write_msd  # noqa: E402


@pytest.fixture
def msd_root(tmp_path: Path) -> Path:
    """A valid MSD folder with 3 labelled 3D cases (classes 0..2)."""
    return write_msd(tmp_path / "msd", n=3)
