"""Server-side DP: Flower's wrapper and accountant, built from the config and kept in the checkpoint."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from amlp_core import protocol as P
from amlp_core.config import build_config
from server.federation import Federation, Progress, privacy_info
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


def test_the_summary_names_the_recipe_with_and_without_site_dp():
    # The private recipe is what trains under site DP; set without DP it trains alone, as the reference a
    # private run's utility is measured against, and the summary must say which of the two a run was.
    private = privacy_info(build_config({"privacy.site_dp": True, "privacy.budget": 8.0}))
    assert "private fine-tuning" in private and "the private recipe without DP" not in private
    assert "privacy.trainable=auto" in private["private fine-tuning"]
    reference = privacy_info(
        build_config({"privacy.trainable": "norms_biases_output", "privacy.optimizer": "sgd", "privacy.lr": 0.05})
    )
    assert reference == {
        "the private recipe without DP": "trains norms_biases_output, sgd at 0.05 "
        "(privacy.trainable=norms_biases_output)"
    }
    assert privacy_info(build_config({})) == {}
