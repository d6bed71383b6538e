"""Checks against the real MSD hippocampus set; skipped where ../shared/data is absent."""

import dataclasses
from pathlib import Path

import pytest

from amlp_core.data import check_dataset, discover, load_samples

from .helpers import SHARED_DATA, shared_dataset

HIPPOCAMPUS = SHARED_DATA / "msd_hippocampus"

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def root() -> Path:
    return shared_dataset(HIPPOCAMPUS, "dataset.json", "MSD hippocampus")


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


def test_the_plan_leaves_the_hippocampus_cases_as_they_were(root):
    """Every hippocampus case is RAS at 1 mm: the plan decided from them is 1 mm MR z-score, and it brings
    each case to the model exactly as before plans existed (the z-scored image, the label, the affine)."""
    import numpy as np

    from amlp_core.config import PlanConfig
    from amlp_core.data.plan import decide_plan, fingerprint, prepare
    from amlp_core.data.transforms import normalize_intensity

    index = discover(root)
    samples = load_samples(dataclasses.replace(index, cases=index.cases[::20]), progress=False)
    plan = decide_plan({"hippocampus": fingerprint(samples, index.modality)}, PlanConfig(), (48, 64, 48), 8)
    assert (plan.target_spacing, plan.modality, plan.normalization) == ((1.0, 1.0, 1.0), "MR", "zscore")
    assert plan.input_size == (48, 64, 48)  # the median case fits in the configured input: it is kept
    for sample in samples:
        planned = prepare(sample, plan)
        np.testing.assert_array_equal(planned.image, normalize_intensity(sample.image))
        np.testing.assert_array_equal(planned.label, sample.label)
        np.testing.assert_array_equal(planned.affine, sample.affine)
