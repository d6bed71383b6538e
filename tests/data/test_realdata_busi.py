"""Checks against the real BUSI breast ultrasound set as it is distributed; skipped where ../shared/data is absent."""

from pathlib import Path

import pytest

from amlp_core.config import Config
from amlp_core.data import check_dataset, discover
from amlp_core.data.duplicates import group_names
from amlp_core.engine.split import data_defaults, read_split

from .helpers import SHARED_DATA, shared_dataset

BUSI = SHARED_DATA / "busi" / "Dataset_BUSI_with_GT"

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def root() -> Path:
    return shared_dataset(BUSI, "benign", "BUSI")


@pytest.fixture(scope="module")
def report(root):
    return check_dataset(root)


def test_busi_is_read_as_it_arrives(root, report):
    assert report.ok, report.render()
    assert report.n_cases == 621 and report.n_labelled == 621
    c = report.contents
    assert c.categories == {"benign": 346, "malignant": 175, "normal": 100}
    assert c.empty_labels == 100  # the normal images: labelled, no lesion
    assert 10 <= len(c.several_masks) <= 20 and all(not n.startswith("normal") for n in c.several_masks)
    assert c.size_min[0] >= 190 and c.size_max[1] <= 1100


def test_busi_near_duplicate_groups(report):
    """About 230 near-duplicate images in about 100 groups (Pawlowska et al. 2023)."""
    groups = report.contents.duplicate_groups
    images = sum(map(len, groups))
    assert 80 <= len(groups) <= 125 and 180 <= images <= 280, (len(groups), images)
    assert max(map(len, groups)) <= 10  # no chain of unrelated images


def test_busi_split_keeps_near_duplicates_on_one_side(root, report):
    defaults = data_defaults(str(root))
    assert defaults["model.spatial_dims"] == 2 and defaults["model.num_classes"] == 2
    cfg = Config().replace(data={"path": str(root)}, model={"spatial_dims": 2, "img_size": (64, 64), "num_classes": 2})
    split = read_split(cfg)
    groups = group_names(report.contents.duplicate_groups)
    train = {groups.get(s.name, s.name) for s in split.train}
    test = {groups.get(s.name, s.name) for s in split.test}
    assert not train & test
    assert len(split.test) == pytest.approx(0.2 * 621, abs=6)
    for category, total in (("benign", 346), ("malignant", 175), ("normal", 100)):
        assert sum(s.category == category for s in split.test) == pytest.approx(0.2 * total, abs=3)
    assert len(discover(root).cases) == 621
