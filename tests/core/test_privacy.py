"""DP-SGD with Opacus on the project's models, and the site's privacy ledger."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from amlp_core.config import MethodConfig, build_config
from amlp_core.data import make_phantom_samples
from amlp_core.data.dataset import SegDataset
from amlp_core.errors import ConfigError
from amlp_core.losses import dice_ce_loss
from amlp_core.methods import METHODS, build_method
from amlp_core.models import SegmentationNet, build_segmentation_model
from amlp_core.privacy import (
    PrivacyBudgetExceeded,
    PrivacyError,
    PrivacyLedger,
    PrivateTraining,
    calibrate_noise,
    check_private,
    epsilon_of,
    steps_per_epoch,
)
from tests.conftest import tiny_config

# Opacus' hooks on the first layer fire with respect to module outputs (images need no gradient).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _dataset(cfg, n=6, labels=True):
    samples = make_phantom_samples(n, cfg.model.img_size, seed=0)
    if not labels:
        samples = [s.__class__(**{**s.__dict__, "label": None}) for s in samples]
    return SegDataset(samples, cfg.model.img_size, augment=False, seed=0)


def _private_steps(model, step_loss, dataset, noise=1.0, clip=1.0, lr=0.05):
    """Run one private pass; returns (stretches, parameters that changed, all trainable parameters)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    seen_per_case = []
    with PrivateTraining(model, opt, dataset, 3, noise, clip, seed=0) as dp:
        for batch in dp.loader:
            if batch is None:
                continue
            loss = step_loss(batch)
            dp.optimizer.zero_grad()
            loss.backward()
            seen_per_case.append(
                all(
                    p.grad_sample is not None and p.grad_sample.shape[0] == batch["image"].shape[0]
                    for p in model.parameters()
                    if p.requires_grad
                )
            )
            dp.optimizer.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p.detach())]
    assert all(p.grad_sample is None for p in model.parameters())  # hooks and per-case gradients removed
    return dp.stretches, changed, list(before), seen_per_case


@pytest.mark.parametrize("name, decoder", [(n, "transformer") for n in sorted(METHODS)] + [("amlp", "unet")])
def test_a_private_pretraining_step_for_every_method(name, decoder, dims):
    """Every method, and SparK's pretraining decoder (its learned fills included), trains under DP-SGD."""
    cfg = tiny_config(dims, **{"model.pretrain_decoder": decoder})
    method = build_method(cfg.model, MethodConfig(name=name), private=True)
    check_private(method)  # Opacus' validator accepts it
    g = torch.Generator().manual_seed(0)
    stretches, changed, trainable, per_case = _private_steps(
        method, lambda b: method.training_step(b["image"], 0.5, g).loss, _dataset(cfg, labels=False)
    )
    assert per_case and all(per_case)  # every trainable parameter had one gradient per case
    assert set(changed) == set(trainable)  # every parameter got its (noised) update
    assert stretches == [(1.0, 0.5, steps_per_epoch(0.5))]  # the accountant counted every step


@pytest.mark.parametrize("arch", ["vit", "unet"])
def test_a_private_finetuning_step(dims, arch):
    """Both segmentation networks (``model.seg_arch``; the U-Net is MONAI's, instance norm) train under DP-SGD."""
    cfg = tiny_config(dims, **{"model.seg_arch": arch})
    model = build_segmentation_model(cfg.model)
    check_private(model)
    loss_fn = dice_ce_loss()
    stretches, changed, trainable, per_case = _private_steps(
        model, lambda b: loss_fn(model(b["image"]), b["label"]), _dataset(cfg)
    )
    assert per_case and all(per_case) and set(changed) == set(trainable)
    assert sum(n for _, _, n in stretches) == 2


def test_clipping_bounds_every_update_without_noise():
    """With no noise, one step of SGD (lr 1) moves the weights by at most the clipping bound."""
    cfg = tiny_config(2)
    model = SegmentationNet(cfg.model)
    loss_fn = dice_ce_loss()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    clip = 1e-3
    dataset = _dataset(cfg, n=3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with PrivateTraining(model, opt, dataset, 3, 0.0, clip, seed=0) as dp:
        batch = next(b for b in dp.loader if b is not None)
        dp.optimizer.zero_grad()
        loss_fn(model(batch["image"]), batch["label"]).backward()
        dp.optimizer.step()
    moved = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in model.parameters()]) - before)
    # mean of per-case gradients each clipped to `clip`, divided by the expected batch size (3)
    assert 0 < moved <= clip * batch["image"].shape[0] / 3 + 1e-7


class _Views(torch.utils.data.Dataset):
    """Records whose every (epoch, view) is another image: what a SegDataset's augmentation gives."""

    def __init__(self, n: int):
        self.n, self.epoch, self.view = n, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_view(self, view: int) -> None:
        self.view = view

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1000 * i + 10 * self.view + self.epoch)
        return {"image": torch.randn(1, 4, 4, generator=g), "index": i}


def test_augmentation_multiplicity_averages_a_records_views_before_clipping():
    """With k views a record, the private gradient is the mean over records of each record's views' mean
    gradient (clipped as one), divided by the expected batch size; without noise, that is all the step is."""
    from amlp_core.privacy.dp import ViewsPerRecord

    views = ViewsPerRecord(_Views(4), 3)
    item = views[2]
    assert item["image"].shape == (3, 1, 4, 4) and item["index"].tolist() == [2, 2, 2]
    assert not torch.equal(item["image"][0], item["image"][1])  # other augmentations of one record
    assert torch.equal(item["image"][0], _Views(4)[2]["image"])  # view 0 is the epoch's own
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with PrivateTraining(model, opt, _Views(4), 4, 0.0, 1e6, seed=0, views=3) as dp:
        batch = next(b for b in dp.loader if b is not None)
        records = batch["index"][::3].tolist()
        assert batch["image"].shape[0] == 3 * len(records) and batch["index"].tolist() == [
            r for r in records for _ in range(3)
        ]
        dp.optimizer.zero_grad()
        (model(batch["image"]) ** 2).mean().backward()
        dp.optimizer.step()
    expected = [torch.zeros_like(p) for p in before]
    reference = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    reference.load_state_dict({k: v for k, v in zip(reference.state_dict(), before, strict=True)})
    for r in records:  # each record: the mean of its 3 views' gradients
        reference.zero_grad()
        (reference(ViewsPerRecord(_Views(4), 3)[r]["image"]) ** 2).mean().backward()
        for e, p in zip(expected, reference.parameters(), strict=True):
            e += p.grad / 4  # / the expected batch size
    for p, b, e in zip(model.parameters(), before, expected, strict=True):
        assert torch.allclose(b - p.detach(), e, atol=1e-5)
    with pytest.raises(ConfigError, match="privacy.augmult"):
        build_config({"privacy.augmult": 0})


def test_opacus_refuses_batch_norm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match="cannot be trained with DP-SGD"):
        check_private(model)


def test_mps_running_loss_is_frozen_under_dp():
    cfg = tiny_config(2)
    images = torch.stack([_dataset(cfg, labels=False)[i]["image"] for i in range(4)])
    method = build_method(cfg.model, MethodConfig(name="amlp"), private=True)
    method.training_step(images, 0.5, torch.Generator().manual_seed(0))
    assert torch.isnan(method.mps.group_loss).all()  # no statistic of the cases steers later masks
    method = build_method(cfg.model, MethodConfig(name="amlp"))
    method.training_step(images, 0.5, torch.Generator().manual_seed(0))
    assert not torch.isnan(method.mps.group_loss).all()


def test_ledger_grows_survives_a_restart_and_refuses_overspending(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, budget=10.0, delta=1e-5)
    ledger.noise_multiplier = 1.2
    eps = []
    for rnd in (1, 2, 3):
        ledger.check(0.2, 10, f"round {rnd}")
        eps.append(ledger.record("finetune", rnd, [(1.2, 0.2, 10)]))
    assert eps[0] < eps[1] < eps[2] < 10.0  # epsilon grows across rounds

    again = PrivacyLedger.open(tmp_path, budget=10.0, delta=1e-5)  # a restarted site reads it back
    assert again.noise_multiplier == 1.2 and again.epsilon == pytest.approx(eps[-1])
    assert [r["round"] for r in again.rounds] == [1, 2, 3]

    with pytest.raises(PrivacyBudgetExceeded, match=r"round 9 would take epsilon from .* past the budget 10"):
        again.check(0.2, 400, "round 9")
    assert again.epsilon == pytest.approx(eps[-1])  # a refused round spends nothing


def test_ledger_is_never_silently_reset(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, 8.0, 1e-5)
    ledger.noise_multiplier = 1.0
    ledger.record("finetune", 1, [(1.0, 0.5, 4)])
    with pytest.raises(PrivacyError, match="delta"):
        PrivacyLedger.open(tmp_path, 8.0, 1e-3)
    ledger.path.write_text(ledger.path.read_text()[:20])  # damaged
    with pytest.raises(PrivacyError, match=str(ledger.path)):
        PrivacyLedger.open(tmp_path, 8.0, 1e-5)


@pytest.mark.slow  # over 10 s: not in the fast tier
def test_calibrated_noise_spends_the_budget_over_the_plan():
    plan = [(0.2, 50), (0.25, 40)]
    for budget in (8.0, 3.0):
        sigma = calibrate_noise(budget, 1e-5, plan)
        spent = epsilon_of([(sigma, q, n) for q, n in plan], 1e-5)
        assert budget * 0.97 <= spent <= budget  # close to the budget, never above
    assert calibrate_noise(3.0, 1e-5, plan) > calibrate_noise(8.0, 1e-5, plan)  # tighter budget, more noise


@pytest.mark.slow  # calibrates twice: over 5 s
def test_a_split_budget_gives_pretraining_its_share_and_fine_tuning_the_rest(tmp_path):
    from amlp_core.privacy import PrivatePhase, ready_ledger

    privacy = build_config({"privacy.site_dp": True, "privacy.phases": "both", "privacy.pretrain_share": 0.25}).privacy
    pre = PrivatePhase(rounds=2, cases=40, epochs=1, name="pretrain")
    fine = PrivatePhase(rounds=3, cases=40, steps=20, name="finetune")
    ledger = ready_ledger(tmp_path, privacy, 8, pre, [fine], "pretrain round 1")
    sigma_pre, sigma_ft = ledger.noise["pretrain"], ledger.noise["finetune"]
    assert ledger.noise_multiplier == sigma_pre
    pre_plan = [(pre.rate(8), pre.rounds * pre.round_steps(8))]
    ft_plan = [(fine.rate(8), fine.rounds * fine.round_steps(8))]
    alone = epsilon_of([(sigma_pre, q, n) for q, n in pre_plan], 1e-5)
    assert 0.25 * 8 * 0.97 <= alone <= 0.25 * 8  # pretraining spends its share by itself
    both = epsilon_of([*((sigma_pre, q, n) for q, n in pre_plan), *((sigma_ft, q, n) for q, n in ft_plan)], 1e-5)
    assert 8 * 0.97 <= both <= 8  # and both phases the whole budget
    # a restarted site, at its first fine-tuning round, reads fine-tuning's noise back
    again = ready_ledger(tmp_path, privacy, 8, PrivatePhase(3, 40, steps=20, name="finetune"), [], "finetune round 1")
    assert again.noise_multiplier == sigma_ft and again.noise == {"pretrain": sigma_pre, "finetune": sigma_ft}
    # without a split: one noise level for both phases
    one = ready_ledger(tmp_path / "one", dataclasses.replace(privacy, pretrain_share=0.0), 8, pre, [fine], "round 1")
    assert set(one.noise) == {""} and sigma_pre > one.noise[""] > sigma_ft  # the split moves noise to pretraining
    for bad, match in (
        ({"privacy.pretrain_share": 0.5}, "needs privacy.phases=both"),
        (
            {"privacy.phases": "both", "privacy.pretrain_share": 0.5, "privacy.noise_multiplier": 1.0},
            "noise_multiplier",
        ),
        ({"privacy.phases": "both", "privacy.pretrain_share": 1.0}, r"must be in \[0, 1\)"),
    ):
        with pytest.raises(ConfigError, match=match):
            build_config(bad)


def test_privacy_config_refuses_combinations_that_would_break_the_guarantee():
    with pytest.raises(ConfigError, match="federation.strategy.*fedprox"):
        build_config({"privacy.site_dp": True, "federation.strategy": "fedprox"})
    with pytest.raises(ConfigError, match="federation.strategy.*fedmedian"):
        build_config({"privacy.server_dp": True, "federation.strategy": "fedmedian"})
    with pytest.raises(ConfigError, match="privacy.phases"):
        build_config({"privacy.phases": "pretrain"})
    assert json.dumps(build_config({"privacy.site_dp": True}).to_dict()["privacy"])


@pytest.mark.slow  # over 5 s (real processes or a long run)
def test_opacus_is_imported_only_where_dp_runs():
    """A run without DP does not pay for Opacus at start (about 2 s: it imports torch.distributed);
    a private stretch imports it when it starts."""
    import subprocess
    import sys

    code = (
        "import sys, fedamlp.cli, amlp_core.engine.pipeline, client.tasks, server.federation\n"
        "assert not [m for m in sys.modules if m.startswith('opacus')], 'opacus imported'\n"
        "from amlp_core.privacy import epsilon_of\n"
        "epsilon_of([(1.0, 0.1, 10)], 1e-5)\n"
        "assert 'opacus' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_summary_says_what_the_epsilon_covers():
    from amlp_core.privacy import coverage

    base = {"privacy.site_dp": True, "federation.pretrain_rounds": 4}
    finetune_only = coverage(build_config(base))
    assert finetune_only.startswith("fine-tuning only; the encoder was pretrained on the sites' own scans WITHOUT DP")
    both = coverage(build_config({**base, "privacy.phases": "both"}))
    assert both.startswith("pretraining and fine-tuning") and "WITHOUT DP" not in both
    split = coverage(build_config({**base, "privacy.phases": "both", "privacy.pretrain_share": 0.3}))
    assert "pretraining's noise spends 30% of the budget by itself (privacy.pretrain_share)" in split
    given = coverage(build_config({**base, "federation.pretrain_rounds": 0, "federation.init_encoder": "runs/pre"}))
    assert "the initial encoder (runs/pre) was made outside this run and is outside the budget" in given
    semi = coverage(build_config({**base, "train.semi_supervised": "mean_teacher"}))
    assert "the unlabelled cases fine-tuning learns from are records too" in semi
    assert all(text.endswith("one record is one patient; evaluation replies are not covered") for text in (both, semi))


@pytest.mark.parametrize("which", ["decoder", "norms_biases", "norms_biases_output"])
def test_a_private_recipe_trains_only_what_it_names(which, tmp_path):
    """privacy.trainable: the frozen parameters stay as they were, the others train under DP-SGD (Opacus takes
    every layer that still trains), and SGD with momentum is there to choose."""
    from amlp_core.engine.pipeline import finetune

    cfg = tiny_config(
        2,
        **{
            "privacy.site_dp": True,
            "privacy.trainable": which,
            "privacy.optimizer": "sgd",
            "train.finetune_steps": 2,
            "train.finetune_lr": 0.05,
        },
    )
    torch.manual_seed(0)
    before = SegmentationNet(cfg.model).state_dict()
    finetune(cfg, tmp_path / "run")
    from amlp_core.engine.checkpoint import load_checkpoint

    after = load_checkpoint(tmp_path / "run" / "checkpoint.pt")[0]["model"]
    changed = {k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    encoder = {k for k in changed if k.startswith("encoder.")}
    if which == "decoder":
        assert changed and not encoder  # the encoder froze, the decoder trained
    else:
        output = {k for k in changed if k.startswith("decoder.up.0.") and not k.endswith(".bias")}
        assert bool(output) == (which == "norms_biases_output")  # the output layer's weights train in that recipe
        rest = changed - output
        assert rest and all(k.endswith(".bias") or "norm" in k for k in rest), sorted(rest)[:5]


def test_private_fine_tuning_has_its_own_learning_rate():
    """privacy.lr: under site DP the schedule peaks at it (SGD on clipped, averaged gradients wants a far
    larger rate than AdamW); without DP, or at 0, train.finetune_lr stays the rate."""
    from amlp_core.engine.optim import finetune_optimizer, set_finetune_lr

    def peak(**overrides):
        cfg = tiny_config(2, **{"train.finetune_lr": 0.002, "train.finetune_warmup": 0.0, **overrides})
        optimizer = finetune_optimizer(SegmentationNet(cfg.model), cfg.train, pretrained=False, privacy=cfg.privacy)
        set_finetune_lr(optimizer, cfg.train, 0.0)
        return type(optimizer).__name__, {g["lr"] for g in optimizer.param_groups}

    private = {"privacy.site_dp": True, "privacy.optimizer": "sgd"}
    assert peak(**private, **{"privacy.lr": 2.0}) == ("SGD", {2.0})
    assert peak(**private) == ("SGD", {0.002})
    assert peak(**{"privacy.lr": 2.0}) == ("AdamW", {0.002})  # not private: the recipe's rate does not apply
    with pytest.raises(ConfigError, match="privacy.lr"):
        build_config({"privacy.lr": -1})


def test_a_recipe_set_without_dp_trains_as_it_stands(tmp_path):
    """privacy.trainable set (not auto) without site DP: the recipe's parameters, optimiser and rate, unclipped and
    without noise (the privacy benchmark's reference); left at auto, everything trains with AdamW."""
    from amlp_core.engine.checkpoint import load_checkpoint
    from amlp_core.engine.optim import finetune_optimizer
    from amlp_core.engine.pipeline import finetune

    sets = {"privacy.trainable": "decoder", "privacy.optimizer": "sgd", "privacy.lr": 0.5}
    cfg = tiny_config(2, **sets, **{"train.finetune_steps": 2})
    optimizer = finetune_optimizer(SegmentationNet(cfg.model), cfg.train, pretrained=False, privacy=cfg.privacy)
    assert type(optimizer).__name__ == "SGD" and {g["peak_lr"] for g in optimizer.param_groups} == {0.5}
    plain = tiny_config(2)
    assert type(finetune_optimizer(SegmentationNet(plain.model), plain.train, False, plain.privacy)).__name__ == "AdamW"
    torch.manual_seed(0)
    before = SegmentationNet(cfg.model).state_dict()
    result = finetune(cfg, tmp_path / "run")
    after = load_checkpoint(tmp_path / "run" / "checkpoint.pt")[0]["model"]
    changed = {k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith("encoder.") for k in changed)  # the decoder trained, the encoder froze
    assert "epsilon" not in result and not (tmp_path / "run" / "privacy_ledger.json").exists()


def test_the_default_private_recipe_is_the_measured_best_for_the_start():
    """privacy.trainable / optimizer / lr left at auto: a decoder that starts pretrained trains its norms, biases
    and output layer with SGD at 0.05, an encoder alone the decoder with SGD at 0.5, nothing pretrained everything
    with AdamW at train.finetune_lr; what is set explicitly is kept, and a private optimiser follows it."""
    from amlp_core.engine.optim import finetune_optimizer, private_recipe, select_trainable

    cfg = tiny_config(2, **{"privacy.site_dp": True, "train.finetune_lr": 0.002})
    spark = cfg.replace(model={"pretrain_decoder": "unet"}, train={"init_decoder": True})
    assert private_recipe(cfg.privacy, cfg.train, pretrained=False) == ("all", "adamw", 0.002)
    assert private_recipe(cfg.privacy, cfg.train, pretrained=True) == ("decoder", "sgd", 0.5)
    assert private_recipe(spark.privacy, spark.train, pretrained=True) == ("norms_biases_output", "sgd", 0.05)
    assert private_recipe(spark.privacy, spark.train, pretrained=False) == ("all", "adamw", 0.002)  # nothing loaded
    bitfit = cfg.replace(privacy={"trainable": "norms_biases", "optimizer": "sgd"}).privacy
    assert private_recipe(bitfit, cfg.train, pretrained=True) == ("norms_biases", "sgd", 0.002)  # no measured rate
    assert private_recipe(cfg.replace(privacy={"lr": 1.0}).privacy, cfg.train, True) == ("decoder", "sgd", 1.0)
    adam = cfg.replace(privacy={"optimizer": "adamw"}).privacy
    assert private_recipe(adam, spark.train, pretrained=True) == ("norms_biases_output", "adamw", 0.002)
    net = SegmentationNet(spark.model)
    optimizer = finetune_optimizer(net, spark.train, pretrained=True, privacy=spark.privacy)
    assert type(optimizer).__name__ == "SGD" and {g["peak_lr"] for g in optimizer.param_groups} == {0.05}
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert trained == select_trainable(SegmentationNet(spark.model), "norms_biases_output")


def test_a_private_run_draws_its_test_curve_without_changing_its_training(tmp_path):
    """Under site DP the test-Dice curve is drawn too (the privacy benchmark's curves), and drawing it changes
    neither the weights nor the epsilon spent: evaluation is a forward pass in eval mode, without gradients."""
    from amlp_core.engine.checkpoint import load_checkpoint
    from amlp_core.engine.pipeline import finetune

    runs = {}
    for every in (2, 0):
        cfg = tiny_config(2, **{"privacy.site_dp": True, "train.finetune_steps": 4, "train.eval_every": every})
        torch.manual_seed(0)
        result = finetune(cfg, tmp_path / f"every{every}")
        lines = [json.loads(x) for x in (tmp_path / f"every{every}" / "metrics.jsonl").read_text().splitlines()]
        runs[every] = (result, lines, load_checkpoint(tmp_path / f"every{every}" / "checkpoint.pt")[0]["model"])
    (curved, lines, weights), (plain, plain_lines, plain_weights) = runs[2], runs[0]
    assert [x["step"] for x in lines if "test_dice_mean" in x] == [2]  # mid-run; the end is the result itself
    assert not any("test_dice_mean" in x for x in plain_lines)
    assert curved["epsilon"] == plain["epsilon"] > 0
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)


def test_a_plan_no_noise_can_keep_within_the_budget_is_refused_naming_the_settings():
    with pytest.raises(PrivacyBudgetExceeded) as err:
        calibrate_noise(0.01, 1e-5, [(1.0, 10**6)])
    message = str(err.value)
    assert "1,000,000 private steps at sample rate up to 1" in message and "privacy.budget=0.01" in message
