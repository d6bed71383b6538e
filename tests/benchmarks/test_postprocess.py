"""The post-processing benchmark: the rule that picks a setting, the scoring, and a real run on BUSI-like images
(a fine-tuned model, its unused labelled images as the development split)."""

import numpy as np
import pytest

from amlp_core.engine.lesions import EMPTY_SHARE, LESION_DICE
from amlp_core.errors import ConfigError
from amlp_core.presets import LESION_IMAGES
from simulations.benchmarks import postprocess
from simulations.benchmarks.postprocess import CONFIDENCES, IMAGE_DICE, SHARES, best_image_dice, pooled, reaching, score
from tests.benchmarks.lesion_runs import benchmark_on_a_run, finetuned


def test_the_two_rules_pick_from_the_grid():
    grid = {
        (True, 0.002, 0.5): {LESION_DICE: 0.70, EMPTY_SHARE: 0.40, IMAGE_DICE: 0.65},
        (True, 0.002, 0.9): {LESION_DICE: 0.60, EMPTY_SHARE: 0.90, IMAGE_DICE: 0.66},
        (False, 0.01, 0.9): {LESION_DICE: 0.55, EMPTY_SHARE: 0.95, IMAGE_DICE: 0.62},
    }
    assert reaching(grid, 0.9) == (True, 0.002, 0.9)  # the best lesion Dice of those reaching it
    assert reaching(grid, 0.99) == (False, 0.01, 0.9)  # none reaches it: the most normal images cleared
    assert best_image_dice(grid) == (True, 0.002, 0.9)


def test_image_dice_counts_a_normal_image_as_one_when_empty():
    lesion = np.zeros((8, 8), np.int64)
    lesion[:4] = 1
    normal = np.zeros((8, 8), np.int64)
    p = np.zeros((2, 8, 8), np.float32)
    p[1, :2] = 0.9  # half the lesion found: Dice 2/3; nothing on the normal image
    p[0] = 1 - p[1]
    figures = pooled([score([(p, lesion), (p * 0 + np.array([1, 0])[:, None, None], normal)], 2, {})])
    assert figures[LESION_DICE] == pytest.approx(2 / 3) and figures[EMPTY_SHARE] == 1.0
    assert figures[IMAGE_DICE] == pytest.approx((2 / 3 + 1) / 2)


def test_a_faint_blob_is_cleared_and_a_confident_lesion_kept():
    def image(confidence):  # probabilities [2, 16, 16] with one 4x4 blob at `confidence`
        p = np.zeros((2, 16, 16), np.float32)
        p[1, 4:8, 4:8] = confidence
        p[0] = 1 - p[1]
        return p

    truth_lesion = np.zeros((16, 16), np.int64)
    truth_lesion[4:8, 4:8] = 1
    scored = [(image(0.97), truth_lesion), (image(0.7), np.zeros((16, 16), np.int64))]
    keep_all = score(scored, 2, {}).metrics()
    assert keep_all[LESION_DICE] == 1.0 and keep_all[EMPTY_SHARE] == 0.0
    decided = score(scored, 2, {"keep_largest": True, "min_share": 0.002, "min_confidence": 0.9}).metrics()
    assert decided[LESION_DICE] == 1.0 and decided[EMPTY_SHARE] == 1.0
    too_strict = score(scored, 2, {"min_confidence": 0.98}).metrics()
    assert too_strict[LESION_DICE] == 0.0  # the lesion image predicted empty scores 0


@pytest.mark.slow
def test_the_benchmark_chooses_on_unused_labelled_images_and_scores_the_test_split(tmp_path):
    base, payload = benchmark_on_a_run(postprocess.main, tmp_path, "post", n_per_class=5, test_fraction=0.3)
    (meta,) = payload["runs"]
    train_images = 15 - meta["test_images"]
    assert 0 < meta["development_images"] < train_images  # the unused half of the labelled training images
    assert len(payload["grid"]) == 2 * len(SHARES) * len(CONFIDENCES)
    settings = [{k: g[k] for k in ("keep_largest", "min_share", "min_confidence")} for g in payload["grid"]]
    assert payload["chosen"] in settings and payload["reaching_target"] in settings
    best = max(payload["grid"], key=lambda g: (g[IMAGE_DICE], g[LESION_DICE]))
    assert payload["test"]["chosen"]["development"][IMAGE_DICE] == pytest.approx(best[IMAGE_DICE])
    assert payload["test"]["in force"]["post"]["min_confidence"] == LESION_IMAGES["model.post_min_confidence"]
    assert payload["test"]["chosen"]["post"] == payload["chosen"]
    assert set(payload["test"]) == {"in force", "chosen", "normals empty >= 0.9", "none"}
    for figures in payload["test"].values():
        assert 0 <= figures[EMPTY_SHARE] <= 1 and len(figures["per_run"]) == 1
    # A semi-supervised run trained on those images: it is refused, naming the run.
    semi = finetuned(base, tmp_path / "semi", **{"train.semi_supervised": "mean_teacher"})
    with pytest.raises(ConfigError, match="semi"):
        postprocess.main([str(semi), "--out", str(tmp_path / "refused.json")])
    assert not (tmp_path / "refused.json").exists()
