"""A pretraining run that is stopped goes on from its last epoch and ends where the whole run ends."""

from __future__ import annotations

import json
import logging

import torch

from amlp_core.engine.artefacts import CHECKPOINT, METRICS, RESUME
from amlp_core.engine.checkpoint import load_checkpoint, save_checkpoint
from amlp_core.engine.pipeline import pretrain
from tests.conftest import tiny_config


def _method_state(run):
    state, meta = load_checkpoint(run / CHECKPOINT)
    return state["method"], meta


def test_a_stopped_pretraining_resumes_and_ends_where_the_uninterrupted_run_ends(tmp_path, caplog):
    cfg = tiny_config(2, **{"train.epochs": 3, "method.name": "amlp", "data.synthetic_cases": 6})
    pretrain(cfg, tmp_path / "whole")
    whole, _ = _method_state(tmp_path / "whole")
    assert not (tmp_path / "whole" / RESUME).exists()  # a finished run leaves no resume state

    run = tmp_path / "stopped"
    pretrain(cfg.replace(train={"max_minutes": 1e-9}), run)  # stops after its first epoch
    _, meta = _method_state(run)
    assert meta["epoch"] == 1 and (run / RESUME).is_file()
    with caplog.at_level(logging.INFO, logger="amlp_core.engine.pipeline"):
        pretrain(cfg, run)  # the same settings (its time limit aside): goes on
    assert "resumed after epoch 1" in caplog.text
    resumed, meta = _method_state(run)
    assert meta["epoch"] == 3 and not (run / RESUME).exists()
    assert [json.loads(line)["epoch"] for line in (run / METRICS).read_text().splitlines()] == [1, 2, 3]
    assert set(resumed) == set(whole)
    for key in whole:
        assert torch.allclose(resumed[key].float(), whole[key].float(), atol=1e-6), key


def test_the_resume_state_of_other_settings_is_not_used(tmp_path, caplog):
    cfg = tiny_config(2, **{"train.epochs": 2, "data.synthetic_cases": 6})
    run = tmp_path / "run"
    pretrain(cfg.replace(train={"max_minutes": 1e-9}), run)
    state, meta = load_checkpoint(run / RESUME)
    save_checkpoint(run / RESUME, state, {**meta, "digest": "another"})
    with caplog.at_level(logging.INFO, logger="amlp_core.engine.pipeline"):
        pretrain(cfg, run)
    assert "is another pretraining's (other settings); this one starts again" in caplog.text
    assert "resumed" not in caplog.text
    assert [json.loads(line)["epoch"] for line in (run / METRICS).read_text().splitlines()] == [1, 2]
