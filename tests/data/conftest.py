"""Shared fixtures for the data tests: small real NIfTI/PNG datasets written to tmp_path."""

from pathlib import Path

import pytest

from .helpers import write_msd


@pytest.fixture
def msd_root(tmp_path: Path) -> Path:
    """A valid MSD folder with 3 labelled 3D cases (classes 0..2)."""
    return write_msd(tmp_path / "msd", n=3)
