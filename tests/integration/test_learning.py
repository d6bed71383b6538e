"""Segmentation learns: on the phantoms, fine-tuning reaches a Dice that the untrained network cannot."""

from __future__ import annotations

import pytest
import torch

from amlp_core.engine.loops import evaluate_segmentation
from amlp_core.engine.pipeline import finetune
from amlp_core.engine.split import load_split
from amlp_core.models import build_segmentation_model
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def test_finetuning_learns_to_segment_the_phantoms(tmp_path):
    """120 steps on 19 phantoms (2D, the tiny network) lift the lesion Dice on the 5 held-out phantoms
    from chance (an untrained network: 0.13) to above 0.6 (measured: 0.73, seeded)."""
    cfg = tiny_config(2, **{"data.synthetic_cases": 24, "train.finetune_steps": 120, "train.batch_size": 8})
    split = load_split(cfg)
    untrained = evaluate_segmentation(
        build_segmentation_model(cfg.model),
        split.test,
        cfg.model.img_size,
        cfg.model.num_classes,
        torch.device("cpu"),
        amp=False,
    )
    trained = finetune(cfg, tmp_path / "fine", split=split)
    assert untrained["dice_mean"] < 0.3
    assert trained["dice_mean"] > 0.6, trained
    assert trained["num_examples"] == len(split.test) == 5
