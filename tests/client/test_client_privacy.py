"""Site DP through the real ClientApp: epsilon reported, kept on disk across restarts, budget enforced."""

from __future__ import annotations

import json

import pytest

from amlp_core import protocol as P
from amlp_core.methods import build_method
from amlp_core.models import SegmentationNet
from amlp_core.privacy import LEDGER_FILE, epsilon_of
from client import site as site_module
from client.app import app
from tests.client.helpers import cfg as _cfg
from tests.client.helpers import context as _context
from tests.client.helpers import instructions as _instructions
from tests.client.helpers import train_message as _train_message

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _round(cfg, ctx, phase, rnd, arrays):
    return app(_train_message(cfg, arrays, _instructions(cfg, phase=phase, rnd=rnd), ctx.node_id), ctx)


def _restart_site():
    site_module._SITES.clear()  # what a SuperNode restart loses: everything but the state directory


def _epsilons_of_rounds(cfg, ctx, rounds) -> list[float]:
    """Run fine-tuning ``rounds`` at the site of ``ctx``; the cumulative epsilon each reply reports."""
    model = SegmentationNet(cfg.model).state_dict()
    eps = []
    for rnd in rounds:
        reply = _round(cfg, ctx, P.FINETUNE, rnd, model)
        assert not reply.has_error(), reply.error.reason
        eps.append(dict(reply.content[P.METRICS])[P.EPSILON])
    return eps


@pytest.mark.slow  # over 5 s (real processes or a long run)
def test_site_dp_epsilon_grows_survives_a_restart_and_stops_at_the_budget(tmp_path):
    cfg = _cfg(
        tmp_path,
        **{
            "privacy.site_dp": True,
            "privacy.budget": 30.0,
            "privacy.noise_multiplier": 0.8,
            "federation.finetune_rounds": 3,
        },
    )
    ctx = _context(cfg, 0)
    eps = _epsilons_of_rounds(cfg, ctx, (1, 2))
    assert 0 < eps[0] < eps[1] <= 30.0

    _restart_site()
    ledger_file = tmp_path / "run" / "sites" / "site0" / LEDGER_FILE
    ledger = json.loads(ledger_file.read_text())
    assert ledger["epsilon"] == pytest.approx(eps[1], abs=1e-5) and [r["round"] for r in ledger["rounds"]] == [1, 2]
    assert epsilon_of(ledger["history"], 1e-5) == pytest.approx(eps[1], rel=1e-6)  # the accountant behind it

    # Round 3 after the restart goes on from the ledger; then a budget that round 4 would pass stops the site.
    model = SegmentationNet(cfg.model).state_dict()
    reply = _round(cfg, ctx, P.FINETUNE, 3, model)
    eps3 = dict(reply.content[P.METRICS])[P.EPSILON]
    assert eps3 > eps[1]
    tight = _cfg(
        tmp_path,
        **{
            "privacy.site_dp": True,
            "privacy.budget": eps3 * 1.05,
            "privacy.noise_multiplier": 0.8,
            "federation.finetune_rounds": 4,
        },
    )
    _restart_site()
    tight_ctx = _context(tight, 0)
    refused = _round(tight, tight_ctx, P.FINETUNE, 4, model)
    assert refused.has_error()
    assert "site site0" in refused.error.reason and "past the budget" in refused.error.reason
    after = json.loads(ledger_file.read_text())
    assert after["epsilon"] == pytest.approx(eps3, abs=1e-5)  # the refused round spent nothing


@pytest.mark.slow  # over 10 s: not in the fast tier
def test_calibrated_noise_plans_the_whole_run_and_pretraining_can_be_private(tmp_path):
    cfg = _cfg(
        tmp_path,
        **{
            "privacy.site_dp": True,
            "privacy.phases": "both",
            "privacy.budget": 8.0,
            "federation.pretrain_rounds": 2,
            "federation.finetune_rounds": 2,
        },
    )
    ctx = _context(cfg, 0)
    encoder = build_method(cfg.model, cfg.method).shared_state_dict()
    replies = [_round(cfg, ctx, P.PRETRAIN, r, encoder) for r in (1, 2)]
    model = SegmentationNet(cfg.model).state_dict()
    replies += [_round(cfg, ctx, P.FINETUNE, r, model) for r in (1, 2)]
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    eps = [dict(r.content[P.METRICS])[P.EPSILON] for r in replies]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(8.0, rel=0.03)  # the plan spends the budget, no more
    assert eps[-1] <= 8.0


def test_without_site_dp_nothing_is_accounted(tmp_path):
    cfg = _cfg(tmp_path)
    ctx = _context(cfg, 0)
    reply = _round(cfg, ctx, P.FINETUNE, 1, SegmentationNet(cfg.model).state_dict())
    assert P.EPSILON not in dict(reply.content[P.METRICS])  # no privacy claim without the accountant
    assert not (tmp_path / "run" / "sites" / "site0" / LEDGER_FILE).exists()


def test_the_site_ledger_is_planned_and_charged_in_the_local_steps(tmp_path):
    # 6 training cases, 3 labelled (half), batch 4: sample rate 1, one draw a pass; 5 steps a round.
    cfg = _cfg(
        tmp_path,
        **{
            "privacy.site_dp": True,
            "privacy.budget": 8.0,
            "train.label_fraction": 0.5,
            "federation.finetune_rounds": 2,
            "federation.finetune_local_steps": 5,
        },
    )
    ctx = _context(cfg, 0)
    eps = _epsilons_of_rounds(cfg, ctx, (1, 2))
    ledger = json.loads((tmp_path / "run" / "sites" / "site0" / LEDGER_FILE).read_text())
    assert [r["steps"] for r in ledger["rounds"]] == [5, 5]
    assert [(q, n) for _, q, n in ledger["history"]] == [(1.0, 5), (1.0, 5)]
    # The noise was calibrated for the planned 2 x 5 steps: the run spends its budget, no more.
    assert eps[0] < eps[1] and eps[1] == pytest.approx(8.0, rel=0.03) and eps[1] <= 8.0


def test_under_site_dp_a_sites_unlabelled_pool_is_on_its_ledger(tmp_path):
    # 16 training cases, 4 labelled (a quarter), 12 in the pool: 16 records at batch 4, sample rate 1/4.
    cfg = _cfg(
        tmp_path,
        **{
            "data.synthetic_cases": 20,
            "privacy.site_dp": True,
            "privacy.budget": 8.0,
            "train.label_fraction": 0.25,
            "train.semi_supervised": "mean_teacher",
            "federation.finetune_rounds": 2,
            "federation.finetune_local_steps": 3,
        },
    )
    ctx = _context(cfg, 0)
    eps = _epsilons_of_rounds(cfg, ctx, (1, 2))
    ledger = json.loads((tmp_path / "run" / "sites" / "site0" / LEDGER_FILE).read_text())
    assert [(q, n) for _, q, n in ledger["history"]] == [(0.25, 3), (0.25, 3)]
    assert eps[1] == pytest.approx(8.0, rel=0.03) and eps[1] <= 8.0  # planned for all 16 records' 6 steps
