"""Flower strategies by name, set up for bounded, explicit rounds."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

from amlp_core.config import FederationConfig
from amlp_core.errors import ConfigError

#: Attributes of server-side optimiser state that a checkpoint must carry (FedOpt family).
STATEFUL_ATTRS = ("m_t", "v_t")


def build_strategy(fed: FederationConfig, evaluate: bool) -> Strategy:
    """The aggregation strategy ``fed.strategy``, sampling every connected site.

    Waiting for sites is done (with a deadline) before each round, so the strategy's own
    wait for ``min_available_nodes`` returns at once.
    """
    common: dict[str, Any] = dict(fraction_train=1.0, fraction_evaluate=1.0 if evaluate else 0.0,
                                  min_train_nodes=fed.min_sites, min_evaluate_nodes=fed.min_sites if evaluate else 0,
                                  min_available_nodes=fed.min_sites)
    if fed.strategy == "fedavg":
        return FedAvg(**common)
    if fed.strategy == "fedprox":
        return FedProx(proximal_mu=fed.proximal_mu, **common)
    if fed.strategy == "fedadam":
        return FedAdam(eta=fed.server_lr, **common)
    if fed.strategy == "fedmedian":
        return FedMedian(**common)
    if fed.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=fed.trim_beta, **common)
    raise ConfigError(f"unknown federation.strategy={fed.strategy!r}")


def strategy_state(strategy: Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """Server optimiser state (e.g. FedAdam's moments) as tensors, for a checkpoint."""
    state = {}
    for attr in STATEFUL_ATTRS:
        value = getattr(strategy, attr, None)
        if value:
            state[attr] = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in value.items()}
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, torch.Tensor]]) -> None:
    for attr, arrays in state.items():
        setattr(strategy, attr, {k: v.numpy() for k, v in arrays.items()})
