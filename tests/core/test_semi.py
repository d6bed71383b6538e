"""Semi-supervised fine-tuning (amlp_core/engine/semi.py): the pool, the teacher, the views, the losses,
a real fine-tuning run, and the federated round's side of it (real Flower messages)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from amlp_core import protocol as P
from amlp_core.config import build_config
from amlp_core.data import Sample
from amlp_core.engine.device import make_generator
from amlp_core.engine.local import semi_training
from amlp_core.engine.pipeline import finetune
from amlp_core.engine.semi import (
    SemiObjective,
    Teacher,
    cutmix_boxes,
    masked_dice_ce,
    paste_boxes,
    rampup,
    strong_view,
    unlabelled_pool,
)
from amlp_core.errors import ConfigError
from amlp_core.models import SegmentationNet
from amlp_core.privacy.ledger import LEDGER_FILE
from client.app import app
from client.state import SiteState
from server.validation import Declarations
from tests.client.helpers import cfg as site_cfg
from tests.client.helpers import context, instructions, train_message
from tests.conftest import tiny_config


def _sample(name: str, labelled: bool = True) -> Sample:
    image = np.zeros((1, 8, 8), np.float32)
    return Sample(name, image, np.zeros((8, 8), np.int64) if labelled else None, np.eye(4))


def test_the_pool_is_every_training_case_whose_label_is_not_used():
    train = [_sample("a"), _sample("b"), _sample("c"), _sample("u", labelled=False)]
    pool = unlabelled_pool(train, [train[0]])
    assert [s.name for s in pool] == ["b", "c", "u"]
    assert all(s.label is None for s in pool)  # their labels are never read
    assert train[1].label is not None  # the site's own cases are not changed
    assert unlabelled_pool(train[:1], train[:1]) == []


def test_the_weight_ramps_up_to_one():
    assert rampup(0.0, 0.1) == pytest.approx(math.exp(-5))
    assert rampup(0.05, 0.1) == pytest.approx(math.exp(-5 * 0.25))
    assert rampup(0.1, 0.1) == rampup(0.7, 0.1) == 1.0
    assert rampup(0.0, 0.0) == 1.0


def test_the_teacher_is_the_moving_average_of_the_student():
    student = torch.nn.Linear(3, 2)
    teacher = Teacher(student, momentum=0.9)
    before = teacher.net.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update(student)
    assert torch.allclose(teacher.net.weight, 0.9 * before + 0.1 * student.weight)
    assert not teacher.net.weight.requires_grad  # out of autograd
    copy = Teacher(student, momentum=0.0)
    with torch.no_grad():
        student.bias.add_(2.0)
    copy.update(student)
    assert torch.equal(copy.net.bias, student.bias)  # momentum 0: the student itself


def test_the_strong_view_moves_intensities_not_pixels():
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(4, 1, 16, 16)
    images[:, :, 4:8, 4:8] = 3.0
    out = strong_view(images, g)
    assert out.shape == images.shape and not torch.equal(out, images)
    bright = out[:, :, 5:7, 5:7].mean(dim=(1, 2, 3))
    dark = out[:, :, 12:, 12:].mean(dim=(1, 2, 3))
    assert (bright > dark + 1.0).all()  # the structure stays where it was
    again = strong_view(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # drawn from the generator alone
    assert strong_view(torch.zeros(2, 1, 8, 8, 8), g).shape == (2, 1, 8, 8, 8)  # 3D too


def test_cutmix_boxes_cover_a_share_of_each_image_when_drawn():
    g = torch.Generator().manual_seed(1)
    partner, box = cutmix_boxes((64, 1, 32, 32), 1.0, g)
    assert sorted(partner.tolist()) == list(range(64))
    shares = box.float().mean(dim=(1, 2, 3))
    assert (shares > 0.01).all() and (shares < 0.45).all()
    _, none = cutmix_boxes((8, 1, 32, 32), 0.0, g)
    assert not none.any()
    _, one = cutmix_boxes((1, 1, 32, 32), 1.0, g)
    assert not one.any()  # a single image has no other to take from


def test_the_masked_loss_counts_only_the_kept_pixels():
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:5, 2:5] = 1
    right = torch.nn.functional.one_hot(target, 2).movedim(-1, 1).float() * 20 - 10  # confident and right
    wrong = -right
    keep = torch.ones(2, 8, 8)
    assert masked_dice_ce(right, target, keep) < 0.01
    assert masked_dice_ce(wrong, target, keep) > 5
    nothing = torch.zeros(2, 8, 8)
    logits = wrong.clone().requires_grad_(True)
    loss = masked_dice_ce(logits, target, nothing)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and not logits.grad.any()
    half = keep.clone()
    half[:, :, 4:] = 0
    mixed = torch.where(torch.arange(8).view(1, 1, 1, 8) < 4, right, wrong)  # wrong only where not kept
    assert masked_dice_ce(mixed, target, half) < 0.01


def test_the_pseudo_label_loss_may_be_cross_entropy_alone():
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:5, 2:5] = 1
    logits = torch.randn(2, 2, 8, 8)
    keep = torch.ones(2, 8, 8)
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert masked_dice_ce(logits, target, keep, dice=False) == pytest.approx(ce.item())
    assert masked_dice_ce(logits, target, keep) != pytest.approx(ce.item())


def test_fixmatch_pseudo_labels_follow_their_boxes():
    cfg = tiny_config(2, **{"train.semi_supervised": "fixmatch", "train.semi_cutmix": 1.0, "train.semi_threshold": 0.5})
    model = SegmentationNet(cfg.model)
    objective = SemiObjective(cfg.train, model, torch.Generator().manual_seed(0))
    images = torch.randn(4, 1, *cfg.model.img_size)
    u = objective.views(images)
    teacher = objective.teacher.probs(images)
    confidence, pseudo = teacher.max(dim=1)
    assert u.images.shape == images.shape and u.pseudo is not None and u.keep is not None
    for i in range(4):  # every pixel's pseudo-label is its own image's or its partner's, where the strong view is
        own = u.pseudo[i] == pseudo[i]
        assert own.any()
        assert ((u.keep[i] == 1) <= ((confidence >= 0.5).any(0))).all()
    logits = model(u.images)
    loss, figures = objective.loss(logits, u)
    assert loss.requires_grad and set(figures) == {"semi_loss", "semi_confident"}
    plain = SemiObjective(dataclasses.replace(cfg.train, semi_cutmix=0.0), model, torch.Generator())
    v = plain.views(images)  # without CutMix: exactly the teacher's argmax, kept where it is confident
    assert torch.equal(v.pseudo, pseudo) and torch.equal(v.keep, (confidence >= 0.5).float())


def test_mean_teacher_matches_the_teachers_probabilities():
    cfg = tiny_config(3, **{"train.semi_supervised": "mean_teacher", "train.semi_noise": 0.05})
    model = SegmentationNet(cfg.model)
    objective = SemiObjective(cfg.train, model, torch.Generator().manual_seed(0))
    images = torch.randn(2, 1, *cfg.model.img_size)
    u = objective.views(images)
    assert u.soft is not None and u.soft.shape == (2, cfg.model.num_classes, *cfg.model.img_size)
    assert torch.allclose(u.soft.sum(1), torch.ones(1))
    assert (u.images - images).abs().max() <= 0.1 + 1e-6  # the noise is clipped at 2 std
    loss, _ = objective.loss(model(u.images), u)
    assert 0 < loss.item() < 0.1  # the same weights on two noisy views: nearly agree


def test_the_mean_teachers_strong_view_moves_the_teachers_probabilities_with_its_boxes():
    cfg = tiny_config(
        2, **{"train.semi_supervised": "mean_teacher", "train.semi_view": "strong", "train.semi_cutmix": 1.0}
    )
    model = SegmentationNet(cfg.model)
    objective = SemiObjective(cfg.train, model, torch.Generator().manual_seed(0))
    images = torch.randn(4, 1, *cfg.model.img_size)
    u = objective.views(images)
    teacher = objective.teacher.probs(images)  # [4, K, *S] on the images as they came
    assert u.soft is not None and u.pseudo is None and u.images.shape == images.shape
    assert not torch.allclose(u.images, images)  # the student sees another view
    for i in range(4):  # every pixel's target is its own image's teacher probabilities or its partner's
        own = (u.soft[i] == teacher[i]).all(0)  # [*S]
        other = torch.stack([(u.soft[i] == teacher[j]).all(0) for j in range(4) if j != i]).any(0)
        assert (own | other).all() and own.any()
    loss, figures = objective.loss(model(u.images), u)
    assert loss.requires_grad and set(figures) == {"semi_loss"}
    plain = SemiObjective(dataclasses.replace(cfg.train, semi_cutmix=0.0), model, torch.Generator())
    assert torch.equal(plain.views(images).soft, teacher)  # without CutMix: exactly the teacher's probabilities


def test_paste_boxes_take_their_share_of_each_side_anywhere():
    g = torch.Generator().manual_seed(0)
    box = paste_boxes((16, 1, 12, 30), 2 / 3, g)
    assert box.shape == (16, 1, 12, 30)
    assert (box.sum(dim=(1, 2, 3)) == 8 * 20).all()  # a box of 8 x 20 in every image
    corners = {tuple(torch.nonzero(b[0])[0].tolist()) for b in box}
    assert len(corners) > 4  # at random places
    assert paste_boxes((2, 1, 6, 6, 6), 0.5, g).sum(dim=(1, 2, 3, 4)).tolist() == [27, 27]  # 3D too


def test_copy_paste_mixes_labels_where_labelled_and_pseudo_labels_elsewhere():
    cfg = tiny_config(2, **{"train.semi_supervised": "copy_paste", "train.semi_paste_weight": 0.25})
    model = SegmentationNet(cfg.model)
    objective = SemiObjective(cfg.train, model, torch.Generator().manual_seed(0))
    size = cfg.model.img_size
    unlabelled = torch.randn(4, 1, *size) - 10.0  # told apart from the labelled images by their values
    images_l = torch.randn(2, 1, *size) + 10.0
    labels_l = torch.ones(2, 1, *size, dtype=torch.long)  # all foreground
    with pytest.raises(ValueError, match="labelled batch"):
        objective.views(unlabelled)
    u = objective.views(unlabelled, (images_l, labels_l))
    pseudo = objective.teacher.probs(unlabelled).argmax(1)
    from_l = u.images[:, 0] > 0  # [U, *S] the pixels pasted from (or kept of) the labelled image
    assert u.pseudo is not None and u.keep is not None
    for i in range(4):
        assert torch.equal(u.images[i, 0][from_l[i]], images_l[i % 2, 0][from_l[i]])  # partner i mod B
        assert torch.equal(u.images[i, 0][~from_l[i]], unlabelled[i, 0][~from_l[i]])
        assert (u.pseudo[i][from_l[i]] == 1).all() and torch.equal(u.pseudo[i][~from_l[i]], pseudo[i][~from_l[i]])
        assert (u.keep[i][from_l[i]] == 1.0).all() and (u.keep[i][~from_l[i]] == 0.25).all()
    share = from_l.float().mean(dim=(1, 2))
    assert (share[0::2] < 0.5).all() and (share[1::2] > 0.5).all()  # both directions: a box in, a box out
    loss, figures = objective.loss(model(u.images), u)
    assert loss.requires_grad and set(figures) == {"semi_loss"}


def _run_cfg(tmp_path, dims: int, method: str, **extra):
    return tiny_config(
        dims,
        **{
            "data.synthetic_cases": 20,
            "train.label_fraction": 0.25,
            "train.finetune_steps": 4,
            "train.semi_supervised": method,
            "train.semi_threshold": 0.5,
            **extra,
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixmatch", "mean_teacher", "mean_teacher strong", "copy_paste"])
def test_a_semi_supervised_finetuning_run_learns_from_the_pool(tmp_path, dims, method):
    method, _, view = method.partition(" ")
    cfg = _run_cfg(tmp_path, dims, method, **{"train.semi_rampup": 0.0, "train.semi_view": view or "noise"})
    result = finetune(cfg, tmp_path / "semi")
    lines = [json.loads(line) for line in (tmp_path / "semi" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["semi_weight"] == 1.0 and line["semi_loss"] > 0 for line in lines)
    assert result["labelled_cases"] == 4  # 25 % of the 16 training cases: the other 12 are the pool
    # the same run without the pool's loss ends elsewhere: the unlabelled cases changed the weights
    plain = finetune(cfg.replace(train={"semi_supervised": "none"}), tmp_path / "plain")
    assert "semi_loss" not in (tmp_path / "plain" / "metrics.jsonl").read_text()
    state = torch.load(tmp_path / "semi" / "checkpoint.pt", weights_only=False)["state"]["model"]
    other = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)["state"]["model"]
    assert any(not torch.equal(state[k], other[k]) for k in state)
    assert plain["labelled_cases"] == 4


def test_without_unlabelled_cases_it_trains_supervised_and_says_so(tmp_path, caplog):
    cfg = _run_cfg(tmp_path, 2, "fixmatch", **{"train.label_fraction": 1.0})
    model = SegmentationNet(cfg.model)
    train = [_sample("a"), _sample("b")]
    with caplog.at_level("WARNING"):
        assert semi_training(cfg, model, train, train, 0, lambda k: 0.0) is None
    assert "no unlabelled case here" in caplog.text
    assert (
        semi_training(cfg.replace(train={"semi_supervised": "none"}), model, train, train[:1], 0, lambda k: 0.0) is None
    )


def test_semi_settings_are_checked():
    with pytest.raises(ConfigError, match="train.semi_supervised='bcp'"):
        build_config({"train.semi_supervised": "bcp"})
    for key, value in (("semi_ema", 1.0), ("semi_threshold", 0.0), ("semi_cutmix", 1.5), ("semi_teacher_start", "x")):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            build_config({f"train.{key}": value})
    with pytest.raises(ConfigError) as err:  # CutMix mixes two cases in one sample: no per-case bound under DP
        build_config({"train.semi_supervised": "fixmatch", "privacy.site_dp": True})
    assert "train.semi_cutmix=0.5" in str(err.value) and "privacy.site_dp=True" in str(err.value)
    build_config({"train.semi_supervised": "fixmatch", "train.semi_cutmix": 0, "privacy.site_dp": True})
    with pytest.raises(ConfigError) as err:  # copy-paste mixes a labelled and an unlabelled patient in every sample
        build_config({"train.semi_supervised": "copy_paste", "privacy.site_dp": True})
    assert "train.semi_supervised='copy_paste'" in str(err.value) and "privacy.site_dp=True" in str(err.value)
    for key, value in (("semi_paste", 1.0), ("semi_paste_weight", -1)):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            build_config({f"train.{key}": value})
    build_config({"train.semi_supervised": "mean_teacher", "privacy.site_dp": True})
    strong = {"train.semi_supervised": "mean_teacher", "train.semi_view": "strong", "privacy.site_dp": True}
    with pytest.raises(ConfigError, match=r"train.semi_cutmix=0.5 with privacy.site_dp=True"):
        build_config(strong)  # the mean teacher's strong view mixes cases too
    build_config({**strong, "train.semi_cutmix": 0})
    with pytest.raises(ConfigError, match="train.semi_view='mixup'"):
        build_config({"train.semi_view": "mixup"})


@pytest.mark.parametrize("method", ["fixmatch", "mean_teacher", "mean_teacher strong"])
def test_a_per_case_loss_depends_on_that_case_alone(method):
    method, _, view = method.partition(" ")
    sets = {"train.semi_supervised": method, "train.semi_cutmix": 0.0, "train.semi_threshold": 0.5}
    cfg = tiny_config(2, **sets, **{"train.semi_view": view or "noise"})
    model = SegmentationNet(cfg.model)
    objective = SemiObjective(cfg.train, model, torch.Generator().manual_seed(0))
    u = objective.views(torch.randn(3, 1, *cfg.model.img_size))
    logits = torch.randn(3, cfg.model.num_classes, *cfg.model.img_size)
    per_case, _ = objective.loss(logits, u, per_case=True)
    assert per_case.shape == (3,)
    changed = logits.clone()
    changed[1] = -changed[1] * 5  # another prediction for case 1 only
    again, _ = objective.loss(changed, u, per_case=True)
    assert again[0] == per_case[0] and again[2] == per_case[2] and again[1] != per_case[1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("method", ["fixmatch", "mean_teacher"])
def test_under_site_dp_the_pool_is_sampled_clipped_and_counted(tmp_path, method):
    cfg = _run_cfg(
        tmp_path,
        2,
        method,
        **{"train.semi_cutmix": 0.0, "train.finetune_steps": 3, "privacy.site_dp": True, "privacy.budget": 8.0},
    )
    result = finetune(cfg, tmp_path / "dp")
    ledger = json.loads((tmp_path / "dp" / LEDGER_FILE).read_text())
    # 4 labelled cases and 12 unlabelled ones are 16 records: batch 4 samples each at 4 / 16
    assert [(q, n) for _, q, n in ledger["history"]] == [(0.25, 3)]
    assert 0 < result["epsilon"] <= 8.0
    lines = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert any("semi_loss" in line for line in lines)  # the unlabelled records entered the loss


def _finetune_message(cfg, model, ctx, rnd=1, **changes):
    return train_message(cfg, model, instructions(cfg, phase=P.FINETUNE, rnd=rnd, **changes), ctx.node_id)


def test_a_site_learns_from_its_pool_and_keeps_its_teacher(tmp_path):
    cfg = site_cfg(
        tmp_path,
        **{
            "data.synthetic_cases": 20,
            "train.label_fraction": 0.25,
            "federation.finetune_local_steps": 3,
            "train.semi_supervised": "fixmatch",
            "train.semi_teacher_start": "keep",
        },
    )
    ctx = context(cfg, 0)
    model = SegmentationNet(cfg.model).state_dict()
    reply = app(_finetune_message(cfg, model, ctx), ctx)
    assert not reply.has_error(), reply.error.reason
    metrics = dict(reply.content[P.METRICS])
    assert metrics[P.NUM_EXAMPLES] == 4 and metrics[P.SEMI_UNLABELLED] == 12  # its 16 training cases, 4 labelled
    assert set(reply.content[P.ARRAYS].to_torch_state_dict()) == set(model)  # the student travels, only it
    kept = SiteState(cfg.federation.run_dir + "/sites/site0").load_before(P.FINETUNE, 2)
    assert set(kept["teacher"]) == set(model)  # the teacher stays at the site
    reply = app(_finetune_message(cfg, reply.content[P.ARRAYS].to_torch_state_dict(), ctx, rnd=2), ctx)
    assert not reply.has_error(), reply.error.reason


def test_a_site_with_other_semi_settings_refuses_the_round(tmp_path):
    cfg = site_cfg(tmp_path, **{"train.semi_supervised": "fixmatch"})
    ctx = context(cfg, 0)
    server = cfg.replace(train={"semi_supervised": "mean_teacher"})
    reply = app(
        _finetune_message(cfg, SegmentationNet(cfg.model).state_dict(), ctx, **{P.SEMI: P.semi_settings(server)}), ctx
    )
    assert reply.has_error()
    reason = reply.error.reason
    assert '"semi_supervised":"mean_teacher"' in reason and '"semi_supervised":"fixmatch"' in reason, reason


def test_a_site_without_a_pool_trains_supervised_and_says_so(tmp_path):
    cfg = site_cfg(tmp_path, **{"train.semi_supervised": "fixmatch", "federation.finetune_local_steps": 2})
    ctx = context(cfg, 0)  # every training case labelled and used: an empty pool
    reply = app(_finetune_message(cfg, SegmentationNet(cfg.model).state_dict(), ctx), ctx)
    assert not reply.has_error(), reply.error.reason
    assert reply.content[P.METRICS][P.SEMI_UNLABELLED] == 0


def test_the_teacher_runs_on_the_students_device():
    cfg = tiny_config(2, **{"train.semi_supervised": "fixmatch"})
    model = SegmentationNet(cfg.model)
    objective = SemiObjective(cfg.train, model, make_generator(0, torch.device("cpu")))
    assert next(objective.teacher.net.parameters()).device == next(model.parameters()).device


def test_the_pool_never_holds_a_test_case(tmp_path, monkeypatch):
    """What the single-site run hands the unlabelled loss: training cases beyond the labelled subset (an MSD
    folder with unlabelled images too), never a test case."""
    from amlp_core.data import write_phantom_dataset
    from amlp_core.engine import local, pipeline
    from amlp_core.engine.split import load_split

    data = write_phantom_dataset(tmp_path / "data", 12, (16, 16), seed=0)
    meta = json.loads((data / "dataset.json").read_text())
    meta["test"] = [e["image"] for e in meta["training"][:3]]  # three images listed without their labels
    meta["training"] = meta["training"][3:]
    (data / "dataset.json").write_text(json.dumps(meta))
    cfg = tiny_config(2, **{"data.path": str(data), "data.synthetic_size": (16, 16), "model.img_size": (16, 16)})
    cfg = cfg.replace(
        train={"semi_supervised": "fixmatch", "label_fraction": 0.5, "finetune_steps": 2}, model={"num_classes": 2}
    )
    seen = {}
    real = local.semi_training

    def spy(cfg, model, train, subset, *args, **kwargs):
        seen["pool"] = {s.name for s in unlabelled_pool(train, subset)}
        seen["subset"] = {s.name for s in subset}
        return real(cfg, model, train, subset, *args, **kwargs)

    monkeypatch.setattr(pipeline, "semi_training", spy)
    split = load_split(cfg)
    finetune(cfg, tmp_path / "run", split=split)
    test = {s.name for s in split.test}
    assert seen["pool"] and test and not seen["pool"] & test and not seen["pool"] & seen["subset"]
    assert {s.name for s in split.train} == seen["pool"] | seen["subset"]  # every other training case is in it


def test_a_site_weighted_by_all_its_cases_counts_its_pool_and_the_server_bounds_it_so(tmp_path):
    """``train.semi_site_weight=all``: num-examples is the labelled cases and the pool learnt from; the server
    bounds it by the training cases the site declared (with ``labelled``, or without a semi-supervised loss, by
    the labelled ones)."""
    cfg = site_cfg(
        tmp_path,
        **{
            "data.synthetic_cases": 20,
            "train.label_fraction": 0.25,
            "federation.finetune_local_steps": 1,
            "train.semi_supervised": "mean_teacher",
            "train.semi_site_weight": "all",
        },
    )
    ctx = context(cfg, 0)
    reply = app(_finetune_message(cfg, SegmentationNet(cfg.model).state_dict(), ctx), ctx)
    assert not reply.has_error(), reply.error.reason
    metrics = dict(reply.content[P.METRICS])
    assert metrics[P.NUM_EXAMPLES] == 16 and metrics[P.SEMI_UNLABELLED] == 12  # 4 labelled + 12 unlabelled
    declared = Declarations(timeout=1.0, declared_for=P.declared_for(cfg))
    declared.counts[7] = {P.DECLARED_TRAIN: 16, P.DECLARED_LABELLED: 4, P.DECLARED_TEST: 4}
    assert declared.bound(7, P.FINETUNE) == 16 and declared.bound(7, P.PRETRAIN) == 16
    for other in ({"semi_site_weight": "labelled"}, {"semi_supervised": "none"}):
        assert P.declared_for(cfg.replace(train=other))[P.FINETUNE] == P.DECLARED_LABELLED
    # The weighting is one of the semi-supervised settings the server sends: a site weighted otherwise refuses.
    server = cfg.replace(train={"semi_site_weight": "labelled"})
    message = _finetune_message(cfg, SegmentationNet(cfg.model).state_dict(), ctx, **{P.SEMI: P.semi_settings(server)})
    refused = app(message, ctx)
    assert refused.has_error() and '"semi_site_weight":"labelled"' in refused.error.reason
