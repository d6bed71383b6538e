"""Server-side DP: Flower's wrapper and accountant, built from the config and kept in the checkpoint."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from amlp_core import protocol as P
from amlp_core.config import build_config
from server.federation import Federation, Progress
from server.strategies import build_strategy, server_accountant


def test_server_dp_wraps_the_strategy_and_weighs_sites_equally(tmp_path):
    cfg = build_config({"privacy.server_dp": True, "federation.sites": 3, "privacy.server_noise_multiplier": 1.1})
    accountant = server_accountant(cfg.federation, cfg.privacy)
    strategy = build_strategy(cfg.federation, evaluate=True, privacy=cfg.privacy, accountant=accountant)
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    assert strategy.noise_multiplier == 1.1 and strategy.num_sampled_clients == 3
    assert strategy.strategy.weighted_by_key == P.UNIT_WEIGHT
    assert server_accountant(build_config({}).federation, build_config({}).privacy) is None


def test_the_server_accountant_survives_a_checkpoint(tmp_path):
    cfg = build_config({"privacy.server_dp": True, "federation.sites": 2, "federation.run_dir": str(tmp_path)})
    fed = Federation(None, cfg)
    for _ in range(3):
        fed.accountant.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=2, population_size=2))
    spent = fed.accountant.get_privacy_spent().epsilon
    strategy = build_strategy(cfg.federation, True, cfg.privacy, fed.accountant)
    fed._save(Progress(P.FINETUNE, 3), ArrayRecord({}), strategy)
    resumed = Federation(None, cfg)
    assert resumed.accountant.get_privacy_spent().epsilon == 0
    resumed._load()
    assert resumed.accountant.get_privacy_spent().epsilon == pytest.approx(spent)
    assert resumed.accountant.num_releases == 3
