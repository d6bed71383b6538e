"""The "lesion present" probe: its scores, its operating point, and a real run on BUSI-like images."""

import numpy as np
import pytest

from amlp_core.errors import ConfigError
from simulations.benchmarks import presence_probe
from simulations.benchmarks.presence_probe import SEGMENTATION, kept_at_cleared, segmentation_score
from tests.benchmarks.lesion_runs import benchmark_on_a_run, finetuned


def test_the_segmentation_score_is_the_mean_probability_over_the_predicted_lesion():
    p = np.zeros((2, 4, 4), np.float32)
    p[0] = 1.0
    assert segmentation_score(p) == 0.0  # nothing predicted
    p[1, :2, :2], p[0, :2, :2] = [[0.9, 0.7], [0.6, 0.2]], [[0.1, 0.3], [0.4, 0.8]]
    assert segmentation_score(p) == pytest.approx((0.9 + 0.7 + 0.6) / 3)  # the 0.2 pixel is background


def test_lesions_kept_where_nine_in_ten_normals_are_cleared():
    normals = np.linspace(0.0, 0.5, 11)  # the 90 % quantile is 0.45
    lesions = np.array([0.1, 0.44, 0.46, 0.9])
    scores = np.concatenate([normals, lesions])
    present = np.array([False] * 11 + [True] * 4)
    assert kept_at_cleared(scores, present) == pytest.approx(0.5)
    assert kept_at_cleared(scores, present, cleared=1.0) == pytest.approx(0.25)  # above every normal


@pytest.mark.slow
def test_the_probe_scores_a_fine_tuned_run_and_refuses_a_network_without_encoder(tmp_path):
    base, payload = benchmark_on_a_run(presence_probe.main, tmp_path, "probe", n_per_class=6, test_fraction=0.34)
    (result,) = payload["runs"]
    images = result["images"]
    assert images["labelled"] + images["development"] + images["test"] == 18
    assert 0 < result["normal_test_images"] < images["test"]
    assert SEGMENTATION in result["scores"]
    assert any(k.endswith("development") for k in result["scores"])  # both kinds among the unused images
    for figures in result["scores"].values():
        assert 0 <= figures["auc"] <= 1 and 0 <= figures["lesions_kept"] <= 1
    assert [row["score"] for row in payload["summary"]] == list(result["scores"])
    unet = finetuned(base, tmp_path / "unet", **{"model.seg_arch": "unet"})
    with pytest.raises(ConfigError, match="no encoder"):
        presence_probe.main([str(unet), "--out", str(tmp_path / "refused.json")])
    assert not (tmp_path / "refused.json").exists()
