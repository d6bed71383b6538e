"""Checks against the real MSD hippocampus set; skipped where ../shared/data is absent."""

import dataclasses
from pathlib import Path

import pytest

from amlp_core.data import check_dataset, discover, load_samples

HIPPOCAMPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "msd_hippocampus"

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def root() -> Path:
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real data not found at {HIPPOCAMPUS} (MSD hippocampus lives outside the repo)")
    return HIPPOCAMPUS


def test_discover_hippocampus(root):
    index = discover(root)
    assert index.fmt == "msd" and index.spatial_dims == 3
    assert len(index.cases) == 208 and all(c.label is not None for c in index.cases)
    assert len(index.class_names) == 3


def test_check_first_cases(root):
    report = check_dataset(root, limit=10)
    assert report.ok, report.render()
    assert report.n_cases == 10 and report.n_labelled == 10


def test_load_first_cases(root):
    index = discover(root)
    samples = load_samples(dataclasses.replace(index, cases=index.cases[:3]), progress=False)
    assert all(s.image.ndim == 4 and s.label.shape == s.image.shape[1:] for s in samples)
    assert {int(v) for s in samples for v in set(s.label.ravel())} <= {0, 1, 2}
