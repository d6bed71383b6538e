"""The fingerprint a site sends, the plan the server makes of them, and a case brought onto the plan."""

import dataclasses

import numpy as np
import pytest

from amlp_core.config import PlanConfig, build_config
from amlp_core.data.cases import Sample
from amlp_core.data.geometry import spacing_of
from amlp_core.data.plan import (
    Fingerprint,
    PlanError,
    decide_input_size,
    decide_plan,
    fingerprint,
    fit_problem,
    modality_name,
    planned_config,
    planned_dims,
    prepare,
    restore,
)
from amlp_core.data.transforms import normalize_intensity
from amlp_core.errors import ConfigError

from .test_geometry import dice, oblique_lps_affine, sphere

BUDGET = (32, 32, 32)  # model.img_size: the input when the median case fits in it, else its voxel count


def case(name, shape=(20, 24, 16), spacing=(1.0, 1.0, 1.0), labelled=True, seed=0, offset=0.0) -> Sample:
    rng = np.random.default_rng(seed)
    image = (rng.normal(100 + offset, 10, size=(1, *shape))).astype(np.float32)
    label = np.zeros(shape, dtype=np.int64)
    label[5:10, 6:12, 4:9] = 1
    image[0][label > 0] += 50
    return Sample(name, image, label if labelled else None, np.diag([*spacing, 1.0]))


def test_modality_names():
    assert [modality_name(m) for m in ("MRI", "mr", "CT", "", "auto", "US")] == [
        "MR",
        "MR",
        "CT",
        "unknown",
        "unknown",
        "US",
    ]


def test_fingerprint_aggregates_only():
    cases = [case("a", (20, 24, 16), (1, 1, 2)), case("b", (30, 24, 10), (1, 1, 3)), case("c", labelled=False)]
    fp = fingerprint(cases, "MRI")
    assert (fp.cases, fp.labelled, fp.modality) == (3, 2, "MR")
    assert fp.spacing_median == (1.0, 1.0, 2.0) and fp.spacing_max == (1.0, 1.0, 3.0)
    assert fp.size_min == (20, 24, 10) and fp.size_median == (20, 24, 16)
    # Intensities over the foreground voxels of the labelled cases only (they are ~150, the background ~100).
    assert fp.foreground_voxels == 2 * 5 * 6 * 5 and 140 < fp.intensity_p50[0] < 160
    record = fp.to_record()
    # Every value is a count, a name or one number per axis/channel: nothing has one entry per case.
    assert all(isinstance(v, (int, str)) or len(v) in (0, 1, 3) for v in record.values())
    assert Fingerprint.from_record(record, "site0") == fp


@pytest.mark.parametrize(
    "change, match",
    [
        ({"cases": -1}, "not a count"),
        ({"spacing_median": [1.0, float("nan"), 1.0]}, "finite"),
        ({"spacing_min": [0.0, 1.0, 1.0]}, "positive"),
        ({"size_max": [1.0] * 40}, "short list"),
        ({"labelled": 99}, "counts"),
        ({"case_sizes": [[1, 2, 3]]}, "unknown values"),
        ({"modality": 5}, "modality"),
    ],
)
def test_fingerprint_from_a_site_is_checked(change, match):
    record = {**fingerprint([case("a")], "MR").to_record(), **change}
    with pytest.raises(PlanError, match=match) as info:
        Fingerprint.from_record(record, "site hospital-b")
    assert "hospital-b" in str(info.value)


def test_sites_of_a_known_modality_decide_the_plans_dimensions():
    mr = fingerprint([case("a"), case("b")], "MR")  # 2 cases of 3D MR
    images = [Sample(f"i{k}", np.zeros((1, 16, 16), np.float32), None, np.eye(3)) for k in range(5)]
    unknown_2d = fingerprint(images, "")  # 5 images of an unknown modality
    us_2d = fingerprint(images, "US")  # 5 ultrasound images
    assert planned_dims({"mr": mr, "other": unknown_2d}) == 2  # unknown counts beside the known modality
    assert planned_dims({"mr": mr, "us": us_2d}) == 2  # the known modality of most cases: US
    assert planned_dims({"mr": mr, "us": us_2d}, modality="MRI") == 3  # the run's modality, where set
    with pytest.raises(PlanError, match="no site"):
        planned_dims({})


def test_mr_plan_is_median_spacing_and_per_case_zscore():
    fps = {
        "a": fingerprint([case("a", spacing=(1, 1, 1)), case("b", spacing=(1, 1, 1))], "MR"),
        "b": fingerprint([case("c", spacing=(0.5, 0.5, 3.0))], "MR"),
    }
    plan = decide_plan(fps, PlanConfig(), BUDGET, 8)
    assert plan.decided and plan.modality == "MR" and plan.normalization == "zscore"
    assert plan.target_spacing == (1.0, 1.0, 1.0)  # two cases at 1 mm outweigh one at 0.5 x 0.5 x 3
    fixed = decide_plan(fps, PlanConfig(target_spacing=(0.8, 0.8, 2.0)), BUDGET, 8)
    assert fixed.target_spacing == (0.8, 0.8, 2.0)


def test_ct_plan_pools_foreground_intensities():
    fps = {
        "a": fingerprint([case("a", offset=0.0)], "CT"),
        "b": fingerprint([case("b", offset=100.0)], "CT"),
    }
    plan = decide_plan(fps, PlanConfig(), BUDGET, 8)
    assert plan.normalization == "ct" and plan.decided
    # Foreground ~150 at one site and ~250 at the other: the pooled mean is between, the std covers both.
    assert 190 < plan.mean < 210 and plan.std > 45
    assert plan.clip[0] < 150 < 250 < plan.clip[1]
    out = prepare(case("x"), plan)
    assert out.image.min() >= (plan.clip[0] - plan.mean) / plan.std - 1e-5


def test_ct_without_labels_needs_explicit_intensities():
    with pytest.raises(PlanError, match="plan.clip"):
        decide_plan({"a": fingerprint([case("a", labelled=False)], "CT")}, PlanConfig(), BUDGET, 8)


def test_sites_that_do_not_fit_are_named_why():
    fps = {"a": fingerprint([case("a")] * 3, "MR"), "b": fingerprint([case("b")], "CT")}
    plan = decide_plan(fps, PlanConfig(), BUDGET, 8)
    assert plan.modality == "MR"
    ct = fit_problem(fingerprint([case("b")], "CT"), plan)
    assert ct is not None and ct.kind == "modality" and "CT" in str(ct)
    assert fit_problem(fingerprint([case("u")], "auto"), plan) is None  # a site that does not know: accepted
    coarse = fit_problem(fingerprint([case("c", spacing=(1.0, 1.0, 5.0))], "MR"), plan)
    assert coarse is not None and coarse.kind == "spacing"
    assert "more than 3x" in str(coarse) and "axis 2" in str(coarse)
    assert fit_problem(fingerprint([case("d", spacing=(1.0, 1.0, 2.5))], "MR"), plan) is None
    flat = fit_problem(fingerprint([Sample("p", np.zeros((1, 8, 8), np.float32), None, np.eye(4))], "MR"), plan)
    assert flat is not None and flat.kind == "dimensions"


def test_the_input_size_is_the_budget_when_the_median_case_fits_in_it():
    # 40^3 voxels at 0.5 mm on a 1 mm plan: 20^3, which a 32^3 input holds whole.
    fps = {"a": fingerprint([case("a", shape=(40, 40, 40), spacing=(0.5, 0.5, 0.5))], "MR")}
    plan = decide_plan(fps, PlanConfig(target_spacing=(1.0, 1.0, 1.0)), BUDGET, 8)
    assert plan.input_size == BUDGET
    assert decide_plan(fps, PlanConfig(input_size=(16, 16, 16)), BUDGET, 8).input_size == (16, 16, 16)  # given


def test_a_larger_median_case_gets_an_input_of_its_shape_within_the_voxel_budget():
    # 64 x 64 x 20 at 0.5 x 0.5 x 3 mm (32 x 32 x 60 mm): the input keeps the in-plane 64 x 64 and takes
    # as many slices as the budget's voxels allow, which is near a cube in mm (32 x 32 x 24 mm).
    fps = {"a": fingerprint([case("a", shape=(64, 64, 20), spacing=(0.5, 0.5, 3.0))] * 3, "MR")}
    plan = decide_plan(fps, PlanConfig(), BUDGET, 8)
    assert plan.target_spacing == (0.5, 0.5, 3.0) and plan.input_size == (64, 64, 8)


@pytest.mark.parametrize(
    "median, spacing, budget, step",
    [
        ((512.0, 512.0, 22.0), (0.43, 0.43, 6.5), (48, 64, 48), 8),
        ((300.0, 90.0, 90.0), (1.0, 1.0, 1.0), (48, 64, 48), 16),
        ((100.0, 700.0), (1.0, 1.0), (64, 64), 8),
        ((33.0, 12.0, 12.0), (1.0, 1.0, 1.0), (32, 32, 32), 8),
    ],
)
def test_a_decided_input_size_fits_the_network_and_the_budget(median, spacing, budget, step):
    size = decide_input_size(median, spacing, budget, step)
    assert len(size) == len(budget) and all(s % step == 0 and s >= step for s in size)
    assert np.prod(size) <= np.prod(budget)
    # Never larger than the median case needs along an axis.
    assert all(s <= max(step, -(-m // step) * step) for s, m in zip(size, median))


def test_slices_of_3d_scans_keep_the_2d_budget():
    fps = {"a": fingerprint([case("a", shape=(64, 64, 64))], "MR")}
    assert decide_plan(fps, PlanConfig(), (32, 32), 8).input_size == (32, 32)


def test_the_planned_config_builds_the_network_for_the_plans_input():
    cfg = build_config({"model.img_size": (32, 32, 32)})
    plan = PlanConfig(target_spacing=(1.0, 1.0, 1.0), modality="MR", normalization="zscore", input_size=(64, 64, 8))
    planned = planned_config(cfg, plan)
    assert planned.model.img_size == (64, 64, 8) and planned.plan == plan
    with pytest.raises(ConfigError, match="model.img_size"):  # a plan the network cannot take
        planned_config(cfg, dataclasses.replace(plan, input_size=(60, 64, 8)))


def test_prepare_keeps_a_ras_case_at_the_target_spacing_unchanged():
    """The hippocampus cases (RAS, 1 mm) reach the model exactly as before the plan existed."""
    sample = case("a")
    plan = PlanConfig(target_spacing=(1.0, 1.0, 1.0), modality="MR", normalization="zscore", input_size=BUDGET)
    out = prepare(sample, plan)
    np.testing.assert_array_equal(out.image, normalize_intensity(sample.image))
    np.testing.assert_array_equal(out.label, sample.label)
    np.testing.assert_array_equal(out.affine, sample.affine)


def test_prepare_and_restore_an_oblique_lps_case():
    shape, affine = (40, 48, 14), oblique_lps_affine()
    centre = (affine @ np.array([20, 24, 7, 1.0]))[:3]
    label = sphere(shape, affine, centre, 9.0)
    sample = Sample("x", (label * 100 + 20).astype(np.float32)[None], label, affine)
    plan = PlanConfig(target_spacing=(1.0, 1.0, 1.0), modality="MR", normalization="zscore", input_size=BUDGET)
    out = prepare(sample, plan)
    np.testing.assert_allclose(spacing_of(out.affine), 1.0)
    assert (
        out.label.shape == out.image.shape[1:]
        and dice(out.label, sphere(out.label.shape, out.affine, centre, 9.0)) > 0.9
    )
    # A "perfect model" on the planned grid: one-hot of the planned label, mapped back onto the scan's grid.
    probs = np.stack([out.label == 0, out.label == 1]).astype(np.float32)
    back = restore(probs, out.affine, shape, affine).argmax(0)
    assert back.shape == shape and dice(back, label) > 0.9


def test_prepare_refuses_an_undecided_plan():
    with pytest.raises(ConfigError, match="not decided"):
        prepare(case("a"), PlanConfig())


def test_thick_slices_get_the_tenth_percentile_spacing_along_their_axis():
    """nnU-Net's rule: a median spacing whose coarse axis is > 3x the others, on cases with > 3x fewer
    voxels along it, targets the 10th percentile of that axis's spacings there, not the median."""
    thick = [case(f"t{k}", shape=(60, 60, 10), spacing=(0.7, 0.7, 5.0)) for k in range(8)]
    thin = [case(f"s{k}", shape=(60, 60, 10), spacing=(0.7, 0.7, 1.5)) for k in range(2)]
    fp = fingerprint(thick + thin, "MR")
    assert fp.spacing_median == (0.7, 0.7, 5.0) and fp.spacing_p10 == (0.7, 0.7, 1.5)
    plan = decide_plan({"a": fp}, PlanConfig(), BUDGET, 8)
    assert plan.target_spacing == (0.7, 0.7, 1.5)
    # Not where the cases have about as many voxels along the thick axis as across it: the median holds.
    cubes = [case(f"c{k}", shape=(20, 20, 20), spacing=(0.7, 0.7, 5.0 if k < 8 else 1.5)) for k in range(10)]
    assert decide_plan({"a": fingerprint(cubes, "MR")}, PlanConfig(), BUDGET, 8).target_spacing == (0.7, 0.7, 5.0)
    # Nor where the spacing is near isotropic.
    near = [case(f"n{k}", shape=(60, 60, 10), spacing=(1.0, 1.0, 2.5 if k < 8 else 1.0)) for k in range(10)]
    assert decide_plan({"a": fingerprint(near, "MR")}, PlanConfig(), BUDGET, 8).target_spacing == (1.0, 1.0, 2.5)
    # A fingerprint from before spacing_p10 existed: the sites' finest spacing stands in for it.
    old = dataclasses.replace(fp, spacing_p10=())
    assert decide_plan({"a": old}, PlanConfig(), BUDGET, 8).target_spacing == (0.7, 0.7, 1.5)
    with pytest.raises(PlanError, match="spacing_p10"):
        Fingerprint.from_record({**fp.to_record(), "spacing_p10": [1.0, 1.0]}, "site0")


def test_thick_slices_are_resampled_on_their_own_by_nearest_neighbour():
    """Separate z: in plane with the plan's interpolation, across the thick slices by nearest neighbour, so
    no output slice blends two scanned slices (nnU-Net); a near-isotropic case is resampled as one."""
    shape = (12, 12, 6)
    slices = np.broadcast_to(np.arange(6, dtype=np.float32) * 10, shape).copy()  # each slice one value
    sample = Sample("t", slices[None], None, np.diag([1.0, 1.0, 4.0, 1.0]))
    plan = PlanConfig(target_spacing=(0.5, 0.5, 1.5), modality="MR", normalization="zscore", input_size=BUDGET)
    out = prepare(sample, plan)
    assert out.image.shape == (1, 24, 24, 16)
    assert len(np.unique(np.round(out.image, 5))) <= 6  # every voxel is one scanned slice's value
    iso = Sample("i", slices[None], None, np.diag([1.0, 1.0, 2.0, 1.0]))  # 2 mm: not anisotropic
    blended = prepare(iso, dataclasses.replace(plan, target_spacing=(1.0, 1.0, 1.0)))
    assert len(np.unique(np.round(blended.image, 5))) > 6  # linear across the slices: values between them
