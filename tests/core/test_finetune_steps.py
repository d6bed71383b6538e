"""Fine-tuning is counted in optimiser steps, so that a small label fraction does not shrink the budget."""

from __future__ import annotations

import json

import pytest

from amlp_core.engine.artefacts import CHECKPOINT, EVALUATION, METRICS
from amlp_core.engine.checkpoint import load_checkpoint
from amlp_core.engine.loops import epoch_steps, finetune_budget
from amlp_core.engine.pipeline import finetune
from amlp_core.engine.split import load_split
from amlp_core.errors import ConfigError
from amlp_core.privacy import LEDGER_FILE, noise_only_step
from amlp_core.schedules import warmup_cosine
from tests.conftest import tiny_config

TRAIN_CASES = 32  # 40 phantoms, 20 % held out


def _cfg(**overrides):
    return tiny_config(2, **{"data.synthetic_cases": 40, "train.batch_size": 4, **overrides})


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


def test_the_split_has_the_cases_the_tests_count_on():
    assert len(load_split(_cfg()).train) == TRAIN_CASES


def test_budget_helpers():
    assert epoch_steps(32, 4) == 8 and epoch_steps(3, 4) == 1 and epoch_steps(7, 4) == 1
    assert finetune_budget(0, 3, 32, 4) == 24 and finetune_budget(5, 3, 32, 4) == 5


@pytest.mark.parametrize("fraction, passes", [(0.1, 16), (1.0, 2)])
def test_the_default_budget_does_not_shrink_with_the_label_fraction(tmp_path, steps_taken, fraction, passes):
    cfg = _cfg(**{"train.epochs": 2, "train.label_fraction": fraction})
    planned = 2 * TRAIN_CASES // 4  # two epochs over all the labelled cases, whatever the fraction keeps
    result = finetune(cfg, tmp_path)
    assert len(steps_taken) == planned and result["steps"] == planned and result["epochs"] == passes
    lines = _metrics(tmp_path)
    assert [m["epoch"] for m in lines] == list(range(1, passes + 1))  # one line per pass over the subset
    assert lines[-1]["step"] == planned and all(m["step"] == (i + 1) * planned // passes for i, m in enumerate(lines))
    _, meta = load_checkpoint(tmp_path / CHECKPOINT)
    assert meta["step"] == planned and meta["epoch"] == passes  # the checkpoint of the end
    assert json.loads((tmp_path / EVALUATION).read_text())["steps"] == planned


@pytest.mark.parametrize("fraction", [0.1, 1.0])
def test_finetune_steps_sets_the_budget_and_the_rate_follows_the_steps(tmp_path, steps_taken, fraction):
    cfg = _cfg(**{"train.finetune_steps": 11, "train.label_fraction": fraction, "train.finetune_warmup": 0.2})
    result = finetune(cfg, tmp_path)
    assert len(steps_taken) == 11 and result["steps"] == 11 and _metrics(tmp_path)[-1]["step"] == 11
    # Warm-up over 20 % of the steps, then cosine to 0, set at every step (at the step's middle).
    expected = [cfg.train.finetune_lr * warmup_cosine((k + 0.5) / 11, 0.2, floor=0.0) for k in range(11)]
    assert steps_taken == pytest.approx(expected)
    assert max(steps_taken) == steps_taken[2] and steps_taken[-1] < 0.02 * cfg.train.finetune_lr


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_the_privacy_ledger_is_planned_and_charged_in_the_real_steps(tmp_path, steps_taken):
    # 8 cases at batch 4: sample rate 0.5, two Poisson draws a pass; 7 steps are 3.5 passes.
    cfg = _cfg(
        **{"train.finetune_steps": 7, "train.label_fraction": 0.25, "privacy.site_dp": True, "privacy.budget": 6.0}
    )
    result = finetune(cfg, tmp_path)
    ledger = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert [(q, n) for _, q, n in ledger["history"]] == [(0.5, 7)] and ledger["rounds"][0]["steps"] == 7
    assert len(steps_taken) == 7 and result["steps"] == 7  # empty draws included: every draw is a step
    # The noise was calibrated for exactly these steps: the run spends its budget, no more.
    assert result["epsilon"] == pytest.approx(6.0, rel=0.03) and result["epsilon"] <= 6.0


@pytest.mark.slow  # over 5 s
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_augmentation_multiplicity_charges_the_same_steps_as_one_view(tmp_path, steps_taken):
    """privacy.augmult=2: every step trains twice the images, the ledger counts the same records and steps."""
    cfg = _cfg(**{"train.finetune_steps": 3, "privacy.site_dp": True, "privacy.budget": 6.0, "privacy.augmult": 2})
    result = finetune(cfg, tmp_path)
    ledger = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert [(q, n) for _, q, n in ledger["history"]] == [(0.125, 3)] and result["steps"] == 3  # 32 cases, batch 4
    assert result["epsilon"] == pytest.approx(6.0, rel=0.03) and result["epsilon"] <= 6.0


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_empty_poisson_draws_are_steps_of_the_budget(tmp_path, steps_taken, monkeypatch):
    # Batch 1 of 32 cases: a draw is empty with probability (31/32)^32 ~ 0.36, and still a step.
    from amlp_core.engine import loops

    empty = []
    monkeypatch.setattr(loops, "noise_only_step", lambda opt: (empty.append(1), noise_only_step(opt)))
    cfg = _cfg(
        **{"train.batch_size": 1, "train.finetune_steps": 12, "privacy.site_dp": True, "privacy.noise_multiplier": 1.0}
    )
    finetune(cfg, tmp_path)
    ledger = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert empty and len(steps_taken) == 12  # the seeded draws hold empty ones; each was one step
    assert [(q, n) for _, q, n in ledger["history"]] == [(1 / 32, 12)]


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.finetune_steps", -1),
        ("train.finetune_warmup", 1.0),
        ("train.finetune_warmup", -0.1),
        ("federation.finetune_local_steps", -2),
    ],
)
def test_the_step_budget_keys_are_checked(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(2, **{key: value})


def test_eval_every_writes_the_test_dice_curve(tmp_path):
    """``train.eval_every``: the test Dice at (about) every that many steps, in metrics.jsonl, before the end."""
    cfg = _cfg(**{"train.finetune_steps": 12, "train.label_fraction": 0.25, "train.eval_every": 4})
    result = finetune(cfg, tmp_path)
    curve = [m for m in _metrics(tmp_path) if "test_dice_mean" in m]
    assert [m["step"] for m in curve] == [4, 8]  # passes of 2 steps (8 cases); the end is evaluation.json
    assert all(0.0 <= m["test_dice_mean"] <= 1.0 and "test_dice_1" in m for m in curve)
    assert result["steps"] == 12
    off = _cfg(**{"train.finetune_steps": 4, "train.label_fraction": 0.25})
    finetune(off, tmp_path / "off")
    assert not any("test_dice_mean" in m for m in _metrics(tmp_path / "off"))


def test_a_pretrained_encoder_ramps_up_while_the_decoder_learns():
    """The fine-tuning recipe: a pretrained encoder at encoder_lr_scale, ramped from 0 over encoder_warmup of
    the steps; an encoder from scratch (the network's down path) at the decoder's rate from the start."""
    from amlp_core.engine.optim import finetune_optimizer, set_finetune_lr
    from amlp_core.models import SegmentationNet

    cfg = _cfg(**{"train.encoder_lr_scale": 0.5, "train.encoder_warmup": 0.2, "train.finetune_warmup": 0.1})
    net = SegmentationNet(cfg.model)
    pre, scratch = finetune_optimizer(net, cfg.train, pretrained=True), finetune_optimizer(net, cfg.train, False)
    for progress, ramp in ((0.05, 0.25), (0.1, 0.5), (0.5, 1.0)):
        set_finetune_lr(pre, cfg.train, progress)
        set_finetune_lr(scratch, cfg.train, progress)
        base = cfg.train.finetune_lr * warmup_cosine(progress, 0.1, floor=0.0)
        decoder, encoder = (g["lr"] for g in pre.param_groups)
        assert decoder == pytest.approx(base) and encoder == pytest.approx(base * 0.5 * ramp)
        assert [g["lr"] for g in scratch.param_groups] == pytest.approx([base, base])


def test_the_same_seed_fine_tunes_the_same_network_whatever_ran_before(tmp_path):
    """The seed fixes the initial weights too (runs paired by seed must differ only in their init)."""
    import torch

    cfg = _cfg(**{"train.finetune_steps": 2, "train.seed": 3})
    split = load_split(cfg)
    states = []
    for i, disturb in enumerate((11, 12345)):
        torch.manual_seed(disturb)  # what a benchmark did in this process before
        finetune(cfg, tmp_path / f"run{i}", split=split)
        states.append(load_checkpoint(tmp_path / f"run{i}" / CHECKPOINT)[0]["model"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_loss_that_is_not_finite_stops_training_before_the_step_keeping_the_weights():
    import torch
    from torch import nn

    from amlp_core.engine.loops import finetune_steps
    from amlp_core.errors import AMLPError, TrainingError

    model = nn.Conv2d(1, 2, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.full((2, 1, 4, 4), float("nan"))
    batch = {"image": image, "label": torch.zeros((2, 1, 4, 4), dtype=torch.int64)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def loss_fn(logits, labels):
        return nn.functional.cross_entropy(logits, labels[:, 0])

    with pytest.raises(TrainingError, match="segmentation loss became nan at step 1; the weights are kept") as e:
        finetune_steps(model, [batch], optimizer, loss_fn, torch.device("cpu"), steps=3, amp=False)
    assert isinstance(e.value, AMLPError)  # one error line at the command line, a named error at a site
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
