"""Pretrain -> fine-tune -> evaluate on the real hippocampus data (skipped where it is absent)."""

from pathlib import Path

import pytest

from amlp_core.config import build_config
from amlp_core.engine.pipeline import finetune, pretrain
from amlp_core.engine.split import data_defaults, load_split

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "msd_hippocampus"

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


@pytest.fixture(scope="module")
def cfg():
    if not (DATA / "dataset.json").exists():
        pytest.skip(f"real data not found at {DATA} (the shared hippocampus set lives outside the repo)")
    return build_config(
        {
            **data_defaults(str(DATA)),
            "model.depth": 1,
            "model.embed_dim": 48,
            "model.num_heads": 4,
            "model.decoder_dim": 24,
            "model.decoder_depth": 1,
            "train.device": "cpu",
            "data.test_fraction": 0.05,
            "train.batch_size": 4,
        }
    )


def test_hippocampus_pipeline(cfg, tmp_path):
    split = load_split(cfg)
    assert len(split.train) + len(split.test) == 208 and split.class_names[1] == "Anterior"
    assert split.train[0].image.shape[0] == 1 and split.train[0].label.max() <= 2
    pretrain(cfg.replace(train={"epochs": 1}), tmp_path / "pre", split)
    result = finetune(
        cfg.replace(train={"finetune_steps": 5, "label_fraction": 0.05}),
        tmp_path / "fine",
        init=tmp_path / "pre",
        split=split,
    )
    assert result["num_examples"] == len(split.test) == 10
    assert {"dice_1", "dice_2", "dice_mean"} <= set(result) and 0.0 <= result["dice_mean"] <= 1.0
