"""The fingerprint a site sends, the plan the server makes of them, and a case brought onto the plan."""

import numpy as np
import pytest

from amlp_core.config import PlanConfig
from amlp_core.data.cases import Sample
from amlp_core.data.geometry import spacing_of
from amlp_core.data.plan import (
    Fingerprint,
    PlanError,
    decide_plan,
    fingerprint,
    fit_problem,
    modality_name,
    prepare,
    restore,
)
from amlp_core.data.transforms import normalize_intensity
from amlp_core.errors import ConfigError

from .test_geometry import dice, oblique_lps_affine, sphere


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


def test_mr_plan_is_median_spacing_and_per_case_zscore():
    fps = {
        "a": fingerprint([case("a", spacing=(1, 1, 1)), case("b", spacing=(1, 1, 1))], "MR"),
        "b": fingerprint([case("c", spacing=(0.5, 0.5, 3.0))], "MR"),
    }
    plan = decide_plan(fps, PlanConfig())
    assert plan.decided and plan.modality == "MR" and plan.normalization == "zscore"
    assert plan.target_spacing == (1.0, 1.0, 1.0)  # two cases at 1 mm outweigh one at 0.5 x 0.5 x 3
    fixed = decide_plan(fps, PlanConfig(target_spacing=(0.8, 0.8, 2.0)))
    assert fixed.target_spacing == (0.8, 0.8, 2.0)


def test_ct_plan_pools_foreground_intensities():
    fps = {
        "a": fingerprint([case("a", offset=0.0)], "CT"),
        "b": fingerprint([case("b", offset=100.0)], "CT"),
    }
    plan = decide_plan(fps, PlanConfig())
    assert plan.normalization == "ct" and plan.decided
    # Foreground ~150 at one site and ~250 at the other: the pooled mean is between, the std covers both.
    assert 190 < plan.mean < 210 and plan.std > 45
    assert plan.clip[0] < 150 < 250 < plan.clip[1]
    out = prepare(case("x"), plan)
    assert out.image.min() >= (plan.clip[0] - plan.mean) / plan.std - 1e-5


def test_ct_without_labels_needs_explicit_intensities():
    with pytest.raises(PlanError, match="plan.clip"):
        decide_plan({"a": fingerprint([case("a", labelled=False)], "CT")}, PlanConfig())


def test_sites_that_do_not_fit_are_named_why():
    plan = decide_plan({"a": fingerprint([case("a")] * 3, "MR"), "b": fingerprint([case("b")], "CT")}, PlanConfig())
    assert plan.modality == "MR"
    assert "CT" in fit_problem(fingerprint([case("b")], "CT"), plan)
    assert fit_problem(fingerprint([case("u")], "auto"), plan) == ""  # a site that does not know: accepted
    coarse = fingerprint([case("c", spacing=(1.0, 1.0, 5.0))], "MR")
    assert "more than 3x" in fit_problem(coarse, plan) and "axis 2" in fit_problem(coarse, plan)
    assert fit_problem(fingerprint([case("d", spacing=(1.0, 1.0, 2.5))], "MR"), plan) == ""


def test_prepare_keeps_a_ras_case_at_the_target_spacing_unchanged():
    """The hippocampus cases (RAS, 1 mm) reach the model exactly as before the plan existed."""
    sample = case("a")
    plan = PlanConfig(target_spacing=(1.0, 1.0, 1.0), modality="MR", normalization="zscore")
    out = prepare(sample, plan)
    np.testing.assert_array_equal(out.image, normalize_intensity(sample.image))
    np.testing.assert_array_equal(out.label, sample.label)
    np.testing.assert_array_equal(out.affine, sample.affine)


def test_prepare_and_restore_an_oblique_lps_case():
    shape, affine = (40, 48, 14), oblique_lps_affine()
    centre = (affine @ np.array([20, 24, 7, 1.0]))[:3]
    label = sphere(shape, affine, centre, 9.0)
    sample = Sample("x", (label * 100 + 20).astype(np.float32)[None], label, affine)
    plan = PlanConfig(target_spacing=(1.0, 1.0, 1.0), modality="MR", normalization="zscore")
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
