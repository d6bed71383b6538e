"""The semi-supervised cost benchmark times the product's own step, with and without the unlabelled side."""

import pytest
import torch

from simulations.benchmarks.semi_cost import _seconds_per_step
from tests.conftest import tiny_config


@pytest.mark.parametrize("method", ["none", "mean_teacher", "fixmatch"])
def test_a_step_of_each_kind_is_timed(method, monkeypatch):
    cfg = tiny_config(2)
    size = cfg.model.img_size
    batch = {"image": torch.randn(2, 1, *size), "label": torch.randint(0, 2, (2, 1, *size))}
    calls = []
    from amlp_core.engine import semi

    seen = semi.SemiObjective.loss
    monkeypatch.setattr(semi.SemiObjective, "loss", lambda self, *a: calls.append(1) or seen(self, *a))
    seconds = _seconds_per_step(cfg, method, 2, batch, torch.randn(2, 1, *size))
    assert seconds > 0
    assert len(calls) == (0 if method == "none" else 3)  # the warm-up step and the 2 timed ones
