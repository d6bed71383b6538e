"""The hospital ClientApp, driven with real Flower messages (no simulation engine needed)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord, RecordDict

from amlp_core import protocol as P
from amlp_core.config import apply_site_file, flat_dict
from amlp_core.data import write_phantom_dataset
from amlp_core.errors import ConfigError
from amlp_core.methods import build_method
from amlp_core.models import SegmentationNet
from client.app import app
from client.state import SiteState
from client.tasks import site_mask_ratio
from tests.client.helpers import cfg as _cfg
from tests.client.helpers import context as _context
from tests.client.helpers import instructions as _instructions
from tests.client.helpers import message as _message
from tests.client.helpers import phantom_plan
from tests.client.helpers import train_message as _train_message


def _encoder_state(cfg) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_method(cfg.model, cfg.method).shared_state_dict()


def test_pretraining_reply_holds_the_encoder_and_aggregates_only(tmp_path):
    cfg = _cfg(tmp_path)
    sent = _encoder_state(cfg)
    ctx = _context(cfg, 0)
    reply = app(_train_message(cfg, sent, _instructions(cfg), ctx.node_id), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    arrays = reply.content[P.ARRAYS].to_torch_state_dict()
    assert set(arrays) == set(sent) and all(k.startswith("encoder.") for k in arrays)  # no decoder weights
    assert all(arrays[k].shape == sent[k].shape for k in sent)  # parameter-shaped arrays only
    assert any(not torch.equal(arrays[k], sent[k]) for k in sent)  # it trained
    metrics = dict(reply.content[P.METRICS])
    assert set(metrics) == {P.NUM_EXAMPLES, P.UNIT_WEIGHT, P.LOSS, P.MASK_RATIO}
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # aggregate scalars, never per-case values
    assert metrics[P.NUM_EXAMPLES] == 6  # the site's training cases (8 phantoms, 20 % held out)
    site = dict(reply.content[P.SITE])
    assert set(site) == {P.SITE_NAME, P.CLASS_NAMES} and site[P.SITE_NAME] == "site0"
    assert json.loads(site[P.CLASS_NAMES]) == {"0": "background", "1": "lesion"}
    assert set(reply.content.config_records) == {P.SITE} and set(reply.content.array_records) == {P.ARRAYS}
    # The decoder and the MPS statistics stayed at the site, on disk.
    local = SiteState(cfg.federation.run_dir + "/sites/site0").load_before(P.PRETRAIN, 2)
    assert any(k.startswith("decoder.") for k in local["method"]) and "mps.group_loss" in local["method"]


def test_all_sites_use_the_servers_ratio_in_every_round(tmp_path):
    cfg = _cfg(tmp_path)
    sent = _encoder_state(cfg)
    ratios = {}
    for site in (0, 1):
        ctx = _context(cfg, site)
        for rnd in (1, 2):
            reply = app(_train_message(cfg, sent, _instructions(cfg, rnd=rnd), ctx.node_id), ctx)
            assert not reply.has_error()
            ratios[site, rnd] = reply.content[P.METRICS][P.MASK_RATIO]
    assert ratios[0, 1] == ratios[1, 1] and ratios[0, 2] == ratios[1, 2]
    assert ratios[0, 2] > ratios[0, 1]  # AMR grows with the server's round counter
    assert ratios[0, 1] == pytest.approx(0.25, abs=1 / cfg.model.num_patches)


def test_a_masking_ratio_mismatch_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    ctx = _context(cfg, 1)
    skewed = _instructions(cfg, rnd=2, **{P.EXPECTED_RATIO: 0.6})
    reply = app(_train_message(cfg, _encoder_state(cfg), skewed, ctx.node_id), ctx)
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith("site site1: masking ratio mismatch in pretraining round 2")
    assert "0.600000" in reason and "0.416667" in reason


def test_a_configuration_skew_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    ctx = _context(cfg, 0)
    reply = app(
        _train_message(cfg, _encoder_state(cfg), _instructions(cfg, **{P.CONFIG_DIGEST: "0" * 16}), ctx.node_id), ctx
    )
    assert reply.has_error() and "configuration differs from the server's" in reply.error.reason


def test_finetune_and_evaluate_round(tmp_path):
    cfg = _cfg(tmp_path)
    ctx = _context(cfg, 0)
    model = SegmentationNet(cfg.model).state_dict()
    reply = app(_train_message(cfg, model, _instructions(cfg, phase=P.FINETUNE), ctx.node_id), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content[P.ARRAYS].to_torch_state_dict()) == set(model)
    ev = _message(
        RecordDict({P.ARRAYS: reply.content[P.ARRAYS], P.CONFIG: _instructions(cfg, P.FINETUNE)}),
        ctx.node_id,
        "evaluate",
    )
    answer = app(ev, ctx)
    metrics = dict(answer.content[P.METRICS])
    assert 0.0 <= metrics["dice_1"] <= 1.0 and metrics[P.NUM_EXAMPLES] == 2


def test_a_broken_dataset_is_that_sites_error_naming_the_kind_not_the_file(tmp_path, caplog):
    data = write_phantom_dataset(tmp_path / "data", n=4, shape=(32, 32), seed=0)
    victim = sorted((data / "imagesTr").iterdir())[0]
    victim.write_bytes(b"not a nifti")
    site_file = tmp_path / "hospital.yaml"
    site_file.write_text(
        yaml.safe_dump({"site": {"name": "st-mary", "state_dir": str(tmp_path / "state")}, "data": {"path": str(data)}})
    )
    cfg = _cfg(tmp_path)
    ctx = _context(cfg, 0, node_config={"site-config": str(site_file)})
    reply = app(_train_message(cfg, _encoder_state(cfg), _instructions(cfg), ctx.node_id), ctx)
    assert reply.has_error()
    assert reply.error.reason == "site st-mary: data problem (1 problem; details in the site's own log)"
    assert str(victim) in caplog.text  # the details stay at the site


def test_a_defect_at_a_site_is_answered_without_its_traceback(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    ctx = _context(cfg, 0)
    reply = app(_message(RecordDict({P.CONFIG: _instructions(cfg)}), ctx.node_id, "train"), ctx)  # no weights
    assert reply.has_error()
    assert reply.error.reason == "site site0: unexpected KeyError (1 problem; details in the site's own log)"
    assert "Traceback" in caplog.text and "Traceback" not in reply.error.reason


def test_site_files_may_set_only_site_keys(tmp_path):
    cfg = _cfg(tmp_path)
    path = tmp_path / "site.yaml"
    own = {"site": {"name": "a", "state_dir": str(tmp_path / "s")}, "data": {"path": str(tmp_path / "d")}}
    path.write_text(yaml.safe_dump({"train": {"device": "cpu", "batch_size": 2}, **own}))
    local = apply_site_file(cfg, path)
    assert local.train.batch_size == 2 and local.site.name == "a" and local.model == cfg.model
    path.write_text(yaml.safe_dump({"model": {"depth": 12}, **own}))
    with pytest.raises(ConfigError, match="model.depth"):
        apply_site_file(cfg, path)
    path.write_text(yaml.safe_dump({"site": {"name": "a"}}))
    with pytest.raises(ConfigError, match="must set data.path and site.state_dir: a site never takes them"):
        apply_site_file(cfg, path)


def test_site_state_keeps_the_newest_two_rounds(tmp_path):
    state = SiteState(tmp_path)
    for rnd in (1, 2, 3):
        state.save(P.PRETRAIN, rnd, {"x": {"w": torch.full((1,), float(rnd))}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain_r0002.pt", "pretrain_r0003.pt"]
    assert state.load_before(P.PRETRAIN, 3)["x"]["w"].item() == 2.0  # a re-run of round 3 starts from round 2
    assert state.load_before(P.PRETRAIN, 2) is None and state.load_before(P.FINETUNE, 9) is None


def test_site_mask_ratio_depends_only_on_the_round(tmp_path):
    from client.site import get_site

    cfg = _cfg(tmp_path)
    a = get_site(9, 1, flat_dict(cfg), {"partition-id": 0, "num-partitions": 2})
    b = get_site(9, 2, flat_dict(cfg), {"partition-id": 1, "num-partitions": 2})
    assert not np.array_equal(a.raw.train[0].image, b.raw.train[0].image)  # different hospitals' data
    assert [site_mask_ratio(a, r) for r in (1, 2, 3)] == [site_mask_ratio(b, r) for r in (1, 2, 3)]


def test_the_example_site_file_is_valid():
    from pathlib import Path

    from amlp_core.config import Config

    example = Path(__file__).resolve().parents[2] / "deploy" / "site.example.yaml"
    cfg = apply_site_file(Config(), example)
    assert cfg.site.name == "st-mary" and cfg.train.label_fraction == 0.1


def _server_instructions(cfg, rnd: int) -> ConfigRecord:
    from server.federation import Federation

    server = Federation(None, cfg)
    server.plan = phantom_plan(cfg)  # what the server decides for phantom sites
    return server._instructions(P.FINETUNE, rnd, cfg.federation.finetune_rounds)


@pytest.mark.parametrize("fraction, local_steps, planned", [(0.25, 0, 8), (1.0, 0, 8), (0.25, 5, 5), (1.0, 5, 5)])
def test_a_finetuning_round_takes_the_planned_local_steps(tmp_path, steps_taken, fraction, local_steps, planned):
    # 20 phantoms a site, 16 for training; batch 4: an epoch over all of them is 4 steps, two local epochs 8,
    # whether the site keeps all 16 labelled cases or 4 (one batch a pass).
    cfg = _cfg(
        tmp_path,
        **{
            "data.synthetic_cases": 20,
            "train.label_fraction": fraction,
            "federation.local_epochs": 2,
            "federation.finetune_local_steps": local_steps,
        },
    )
    ctx = _context(cfg, 0)
    reply = app(
        _train_message(cfg, SegmentationNet(cfg.model).state_dict(), _server_instructions(cfg, 1), ctx.node_id), ctx
    )
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert len(steps_taken) == planned
    assert dict(reply.content[P.METRICS])[P.NUM_EXAMPLES] == round(16 * fraction)  # samples, not batches


def test_the_finetuning_rate_follows_the_steps_over_the_whole_run(tmp_path, steps_taken):
    cfg = _cfg(
        tmp_path,
        **{"federation.finetune_rounds": 2, "federation.finetune_local_steps": 6, "train.finetune_warmup": 0.25},
    )
    ctx = _context(cfg, 0)
    model = SegmentationNet(cfg.model).state_dict()
    for rnd in (1, 2):
        reply = app(_train_message(cfg, model, _server_instructions(cfg, rnd), ctx.node_id), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        model = reply.content[P.ARRAYS].to_torch_state_dict()
    from amlp_core.schedules import warmup_cosine

    expected = [cfg.train.finetune_lr * warmup_cosine((k + 0.5) / 12, 0.25, floor=0.0) for k in range(12)]
    assert steps_taken == pytest.approx(expected)  # warm-up in round 1, then cosine to 0 over both rounds


def test_a_local_steps_mismatch_is_refused(tmp_path):
    cfg = _cfg(tmp_path, **{"federation.finetune_local_steps": 4})
    ctx = _context(cfg, 0)
    model = SegmentationNet(cfg.model).state_dict()
    for sent, needle in (
        (7, "the server plans 7 local steps per fine-tuning round"),
        (0, "the server plans local epochs over all labelled cases per fine-tuning round"),
    ):
        reply = app(
            _train_message(cfg, model, _instructions(cfg, phase=P.FINETUNE, **{P.LOCAL_STEPS: sent}), ctx.node_id), ctx
        )
        assert reply.has_error()
        assert reply.error.reason.startswith("site site0: " + needle), reply.error.reason
        assert "this site 4 local steps" in reply.error.reason
    old = _instructions(cfg, phase=P.FINETUNE)
    del old[P.LOCAL_STEPS]  # a server from before the key
    reply = app(_train_message(cfg, model, old, ctx.node_id), ctx)
    assert reply.has_error() and f"lacks {P.LOCAL_STEPS!r}" in reply.error.reason


def test_a_first_round_message_brings_the_site_onto_the_planned_input_size(tmp_path):
    """A site's first message may be a round (a simulated site in a fresh process): it takes the plan's
    input size before it compares its network's digest with the server's."""
    from amlp_core.data.plan import planned_config

    cfg = _cfg(tmp_path, **{"data.synthetic_size": "32,16"})
    planned = planned_config(cfg, dataclasses.replace(phantom_plan(cfg), input_size=(32, 16)))
    assert planned.model.img_size != cfg.model.img_size
    ctx = _context(cfg, 0)  # the run config the site reads: model.img_size as configured
    reply = app(_train_message(cfg, _encoder_state(planned), _instructions(planned), ctx.node_id), ctx)
    assert not reply.has_error(), reply.error.reason
    assert reply.content[P.METRICS][P.NUM_EXAMPLES] > 0


def test_simulated_sites_take_their_own_label_fraction(tmp_path):
    """``federation.site_label_fractions``: each simulated site fine-tunes on its own share of its labelled
    cases, and declares it; a list that does not fit the sites, or a value outside (0, 1], is refused."""
    from client.site import get_site
    from client.tasks import declaration

    cfg = _cfg(tmp_path, **{"data.synthetic_cases": 20, "federation.site_label_fractions": "0.25,1"})
    sites = [get_site(11, 1 + i, flat_dict(cfg), {"partition-id": i, "num-partitions": 2}) for i in (0, 1)]
    for site in sites:
        site.use_plan(phantom_plan(cfg))
    assert [s.cfg.train.label_fraction for s in sites] == [0.25, 1.0]
    counts = [declaration(s) for s in sites]
    assert counts[0][P.DECLARED_LABELLED] < counts[0][P.DECLARED_TRAIN] == counts[0][P.DECLARED_LABELLED] * 4
    assert counts[1][P.DECLARED_LABELLED] == counts[1][P.DECLARED_TRAIN]
    for bad, why in (("0.5", "gives 1 label fractions for 2 sites"), ("0.5,0", "entry '0' is not a label fraction")):
        with pytest.raises(ConfigError, match=why):
            _cfg(tmp_path, **{"federation.site_label_fractions": bad})
