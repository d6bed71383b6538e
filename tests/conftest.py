"""Fixtures shared by all tests: tiny model configurations that run in a second on a CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from amlp_core.config import Config, ModelConfig, build_config

torch.set_num_threads(min(torch.get_num_threads(), 2))
logging.getLogger("amlp_core").setLevel(logging.INFO)


def tiny_model(dims: int) -> ModelConfig:
    """A small ViT (2 blocks, 48 wide) on 32x32 (2D, patch 4) or 16^3 (3D, patch 4) images."""
    size = (32, 32) if dims == 2 else (16, 16, 16)
    return ModelConfig(
        spatial_dims=dims,
        img_size=size,
        patch_size=4,
        embed_dim=48,
        depth=2,
        num_heads=4,
        decoder_dim=24,
        decoder_depth=1,
        decoder_heads=4,
        conv_channels=(8, 16),
        num_classes=2,
    )


def tiny_config(dims: int = 2, **overrides) -> Config:
    m = tiny_model(dims)
    base = {
        "model": {k: getattr(m, k) for k in m.__dataclass_fields__},
        "data": {"synthetic_size": m.img_size, "synthetic_cases": 12},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu"},
    }
    cfg = build_config(base)
    return build_config(overrides, base=cfg) if overrides else cfg


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def dims(request) -> int:
    return request.param


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def steps_taken(monkeypatch) -> list[float]:
    """The base rate of every optimiser step taken (DP-SGD's optimizer steps the wrapped AdamW too)."""
    lrs: list[float] = []
    step = torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])  # the decoder's group: scale 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    return lrs
