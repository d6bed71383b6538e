"""What a site tells the server before the run's plan exists: its fingerprint, aggregates only; and a site
refusing a plan its data do not fit. Driven with real Flower query messages to the real ClientApp."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, RecordDict

from amlp_core import protocol as P
from amlp_core.config import PlanConfig
from amlp_core.data.plan import Fingerprint, plan_text
from client.app import app
from tests.client.helpers import cfg as _cfg
from tests.client.helpers import context as _context
from tests.client.helpers import message as _message
from tests.data.helpers import save_nii

#: Five cases, each of its own size and spacing, so that a per-case value would be recognisable.
SHAPES = [(16, 18, 12), (20, 16, 14), (18, 22, 10), (24, 20, 16), (14, 24, 18)]
SPACINGS = [(1.0, 1.0, 1.5), (0.9, 0.9, 2.0), (1.1, 1.1, 1.0), (1.0, 1.0, 3.0), (0.8, 0.8, 2.5)]


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    rng = np.random.default_rng(0)
    for i, (shape, spacing) in enumerate(zip(SHAPES, SPACINGS)):
        affine = np.diag([*spacing, 1.0])
        label = np.zeros(shape, np.uint8)
        label[4:8, 4:8, 3:6] = 1
        save_nii(
            root / "data" / "images" / f"p{i}.nii.gz", rng.normal(300 + 10 * i, 20, shape).astype(np.float32), affine
        )
        if i < 3:  # two unlabelled
            save_nii(root / "data" / "labels" / f"p{i}.nii.gz", label, affine)
    return root


def _query(tmp_path, hospital, config: dict, modality="MR"):
    site = {"site": {"name": "st-mary", "state_dir": str(tmp_path / "state")}}
    site["data"] = {"path": str(hospital / "data"), "modality": modality, "test_fraction": 0.0}
    path = tmp_path / "hospital.yaml"
    path.write_text(yaml.safe_dump(site))
    cfg = _cfg(tmp_path, **{"model.spatial_dims": 3, "model.img_size": "16,16,16", "data.synthetic_size": "16,16,16"})
    ctx = _context(cfg, 0, node_config={"site-config": str(path)})
    return app(_message(RecordDict({P.CONFIG: ConfigRecord(config)}), ctx.node_id, "query"), ctx)


def test_the_first_answer_is_the_fingerprint_and_nothing_per_case(tmp_path, hospital):
    reply = _query(tmp_path, hospital, {})
    assert not reply.has_error(), reply.error.reason
    # Exactly two records leave the site: the fingerprint and the site's name and class names.
    assert set(reply.content.keys()) == {P.FINGERPRINT, P.SITE}
    assert set(reply.content[P.SITE].keys()) == {P.SITE_NAME, P.CLASS_NAMES}
    record = dict(reply.content[P.FINGERPRINT])
    assert set(record) == {f for f in Fingerprint.__dataclass_fields__}
    fp = Fingerprint.from_record(record, "st-mary")
    assert (fp.cases, fp.labelled, fp.modality) == (5, 3, "MR")
    # Each value is a count, a name, or one number per axis or channel: never one per case.
    for key, value in record.items():
        assert isinstance(value, (int, str)) or len(value) in (0, 1, 3), key
    sizes, spacings = np.array(SHAPES, float), np.array(SPACINGS)
    assert fp.size_median == tuple(np.median(sizes, 0)) and fp.size_min == tuple(sizes.min(0))
    np.testing.assert_allclose(fp.spacing_max, spacings.max(0), rtol=1e-6)  # (NIfTI keeps float32)
    # Foreground intensities of the three labelled cases, pooled: no case's own mean is sent.
    case_means = [300 + 10 * i for i in range(3)]
    assert fp.foreground_voxels == 3 * 4 * 4 * 3 and min(case_means) - 5 < fp.intensity_mean[0] < max(case_means) + 5


def test_a_plan_for_another_modality_is_refused_saying_why(tmp_path, hospital):
    plan = PlanConfig(
        target_spacing=(1.0, 1.0, 2.0),
        modality="CT",
        normalization="ct",
        clip=(-100, 200),
        std=50,
        input_size=(16, 16, 16),
    )
    reply = _query(tmp_path, hospital, {P.PLAN: plan_text(plan)})
    assert reply.has_error()
    assert "st-mary's data do not fit the run's plan" in reply.error.reason
    assert "its scans are MR, the run's plan is for CT" in reply.error.reason


def test_with_the_plan_the_site_declares_its_counts(tmp_path, hospital):
    plan = PlanConfig(target_spacing=(1.0, 1.0, 2.0), modality="MR", normalization="zscore", input_size=(16, 16, 16))
    reply = _query(tmp_path, hospital, {P.PLAN: plan_text(plan)})
    assert not reply.has_error(), reply.error.reason
    assert reply.content[P.METRICS][P.DECLARED_TRAIN] == 5 and reply.content[P.METRICS][P.DECLARED_LABELLED] == 3


def test_an_invalid_plan_is_refused(tmp_path, hospital):
    reply = _query(tmp_path, hospital, {P.PLAN: '{"target_spacing": [-1, 1, 1], "modality": "MR"}'})
    assert reply.has_error() and "plan.target_spacing" in reply.error.reason
