"""Flower strategies by name, set up for bounded, explicit rounds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod
from flwr.supercore.privacy_accounting import PrivacyConfig as FlowerPrivacyConfig

from amlp_core import protocol as P
from amlp_core.config import STRATEGIES, FederationConfig, PrivacyConfig
from amlp_core.engine.lesions import LESION_KEYS, pool_lesion_metrics
from amlp_core.errors import ConfigError

#: Attributes of server-side optimiser state that a checkpoint must carry (FedOpt family).
STATEFUL_ATTRS = ("m_t", "v_t")


def server_accountant(fed: FederationConfig, privacy: PrivacyConfig) -> RdpAccountant | None:
    """Flower's RDP accountant for client-level DP over the whole run (None without server DP).

    Every round takes all ``federation.sites`` sites (no sampling, so no amplification is claimed);
    neighbouring federations differ by one site's whole data.
    """
    if not privacy.server_dp:
        return None
    return RdpAccountant(
        FlowerPrivacyConfig(
            target_delta=privacy.delta,
            population_size=fed.sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=privacy.server_budget or None,
        )
    )


def pool_evaluations(contents: list[RecordDict], weighting_key: str) -> MetricRecord:
    """The sites' evaluation metrics as one: Dice per class weighted by ``weighting_key`` (Flower's
    default), the lesion metrics pooled from their counts (:func:`~amlp_core.engine.lesions.pool_lesion_metrics`)."""
    pooled = aggregate_metricrecords(contents, weighting_key)
    for key in LESION_KEYS:
        if key in pooled:
            del pooled[key]
    sites = [dict(next(iter(c.metric_records.values()))) for c in contents]
    for key, value in pool_lesion_metrics(sites).items():
        pooled[key] = value
    return pooled


def build_strategy(
    fed: FederationConfig, evaluate: bool, privacy: PrivacyConfig | None = None, accountant: RdpAccountant | None = None
) -> Strategy:
    """The aggregation strategy ``fed.strategy``, sampling every connected site.

    Waiting for sites is done (with a deadline) before each round, so the strategy's own
    wait for ``min_available_nodes`` returns at once. With an ``accountant`` (server DP in
    this phase) the strategy is wrapped in Flower's server-side fixed-clipping DP, which
    clips each site's update, noises the average and composes each release in the accountant;
    sites then weigh equally, as that accounting requires.
    """
    common: dict[str, Any] = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0 if evaluate else 0.0,
        min_train_nodes=fed.min_sites,
        min_evaluate_nodes=fed.min_sites if evaluate else 0,
        min_available_nodes=fed.min_sites,
        evaluate_metrics_aggr_fn=pool_evaluations,
    )
    if accountant is None:
        return _base_strategy(fed, common)
    equal = {"fedavg": _EqualSitesFedAvg, "fedprox": _EqualSitesFedProx}[fed.strategy]
    extra = {"proximal_mu": fed.proximal_mu} if fed.strategy == "fedprox" else {}
    strategy = equal(**common, **extra, weighted_by_key=P.UNIT_WEIGHT)
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=privacy.server_noise_multiplier,
        clipping_norm=privacy.server_clipping_norm,
        num_sampled_clients=fed.sites,
        accountant=accountant,
    )


class _EvaluateByCases:
    """Training averages weigh sites equally (``weighted_by_key`` = unit weight, as Flower's
    accounted DP requires); evaluation metrics stay weighted by each site's number of cases."""

    def aggregate_evaluate(self, server_round, replies):
        key, self.weighted_by_key = self.weighted_by_key, P.NUM_EXAMPLES
        try:
            return super().aggregate_evaluate(server_round, replies)
        finally:
            self.weighted_by_key = key


class _EqualSitesFedAvg(_EvaluateByCases, FedAvg):
    pass


class _EqualSitesFedProx(_EvaluateByCases, FedProx):
    pass


#: ``federation.strategy`` (the config's closed set, STRATEGIES) -> its Flower strategy, from the plan and the
#: settings every strategy shares.
BUILDERS: dict[str, Callable[[FederationConfig, dict[str, Any]], Strategy]] = {
    "fedavg": lambda fed, common: FedAvg(**common),
    "fedprox": lambda fed, common: FedProx(proximal_mu=fed.proximal_mu, **common),
    "fedadam": lambda fed, common: FedAdam(eta=fed.server_lr, **common),
    "fedmedian": lambda fed, common: FedMedian(**common),
    "fedtrimmedavg": lambda fed, common: FedTrimmedAvg(beta=fed.trim_beta, **common),
}
if set(BUILDERS) != set(STRATEGIES):
    raise ImportError(f"strategies {sorted(BUILDERS)} differ from the config's {STRATEGIES}")


def _base_strategy(fed: FederationConfig, common: dict[str, Any]) -> Strategy:
    if fed.strategy not in BUILDERS:
        raise ConfigError(f"unknown federation.strategy={fed.strategy!r}")
    return BUILDERS[fed.strategy](fed, common)


def strategy_state(strategy: Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """Server optimiser state (e.g. FedAdam's moments) as tensors, for a checkpoint."""
    strategy = getattr(strategy, "strategy", strategy)  # inside a DP wrapper
    state = {}
    for attr in STATEFUL_ATTRS:
        value = getattr(strategy, attr, None)
        if value:
            state[attr] = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in value.items()}
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, torch.Tensor]]) -> None:
    strategy = getattr(strategy, "strategy", strategy)  # inside a DP wrapper
    for attr, arrays in state.items():
        setattr(strategy, attr, {k: v.numpy() for k, v in arrays.items()})
