"""Injected faults in real Flower simulations (``federation.inject``): what the run does with each.

The server rejects what it must not average (NaN weights, a scaled update, an inflated count, a
wrong shape), records each site's failure with the reason, and goes on while ``min_sites`` remain.
"""

from __future__ import annotations

import pytest
import torch

from amlp_core import protocol as P
from amlp_core.engine.artefacts import load_segmentation
from simulations.simulate import SimulationError, simulate
from tests.integration.helpers import assert_no_process_left, round_rows, sim_config

pytestmark = pytest.mark.slow


def _site_rows(run, **match) -> list[dict]:
    return [r for r in round_rows(run) if r["site"] != P.ALL_SITES and all(r[k] == v for k, v in match.items())]


def test_hostile_and_failing_sites_are_rejected_and_the_others_finish(tmp_path):
    run = tmp_path / "run"
    faults = "site3:nan@pretrain:1,site2:poison@pretrain:2,site1:inflate@finetune:1,site0:crash@evaluate,site1:slow=1"
    cfg = sim_config(
        run,
        **{
            "data.synthetic_cases": 16,
            "federation.sites": 4,
            "federation.min_sites": 2,
            "federation.pretrain_rounds": 2,
            "federation.inject": faults,
        },
    )
    simulate(cfg, timeout=900)
    assert_no_process_left(run)
    status = {
        (r["phase"], r["round"], r["kind"], r["site"]): (r["status"], r.get("error", "")) for r in _site_rows(run)
    }
    assert status["pretrain", 1, "train", "site3"][0] == P.REJECTED
    assert "holds non-finite values" in status["pretrain", 1, "train", "site3"][1]
    assert status["pretrain", 2, "train", "site2"][0] == P.REJECTED
    assert "update norm" in status["pretrain", 2, "train", "site2"][1]
    assert status["finetune", 1, "train", "site1"][0] == P.REJECTED
    assert "num-examples=1e+09 exceeds" in status["finetune", 1, "train", "site1"][1]
    assert status["finetune", 1, "evaluate", "site0"] == (P.ERROR, "site site0: injected fault: crash")
    faulty = {("pretrain", 1, "train", "site3"), ("pretrain", 2, "train", "site2")}
    faulty |= {("finetune", 1, "train", "site1"), ("finetune", 1, "evaluate", "site0")}
    assert all(s == P.OK for key, (s, _) in status.items() if key not in faulty)
    model, _ = load_segmentation(run / "model")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    summary = (run / "results" / "summary.md").read_text()
    assert "site3: rejected: " in summary and "site0: error: " in summary


def test_a_round_left_with_too_few_acceptable_replies_fails_the_run_saying_why(tmp_path):
    run = tmp_path / "run"
    cfg = sim_config(run, **{"federation.inject": "site1:shape@pretrain:1"})
    with pytest.raises(SimulationError, match="rejected"):
        simulate(cfg, timeout=600)
    assert_no_process_left(run)
    failed = (run / "FAILED").read_text()
    assert failed.count("\n") == 1 and "site1: rejected - " in failed and "float32[1]" in failed
    assert not (run / "model").exists() and not (run / "encoder").exists()


def test_an_offline_site_is_missing_and_the_run_goes_on(tmp_path):
    run = tmp_path / "run"
    cfg = sim_config(
        run,
        **{
            "federation.sites": 3,
            "data.synthetic_cases": 12,
            "federation.round_timeout": 20,
            "federation.inject": "site2:offline@finetune:1",
        },
    )
    simulate(cfg, timeout=600)
    assert_no_process_left(run)
    train = {r["site"]: r for r in _site_rows(run, phase="finetune", kind="train")}
    assert train["site2"]["status"] == P.MISSING and train["site0"]["status"] == train["site1"]["status"] == P.OK
    assert (run / "model" / "checkpoint.pt").exists()
