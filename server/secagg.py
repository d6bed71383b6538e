"""SecAgg+ training rounds: the server learns only the weighted sum of the sites' updates.

Flower 1.41 has SecAgg+ only in the legacy API: :class:`flwr.server.workflow.SecAggPlusWorkflow`
runs one round's four stages (setup, share keys, collect masked vectors, unmask) on a
:class:`~flwr.server.compat.LegacyContext`, asks the context's *legacy* strategy for the
``FitIns`` (``configure_fit``) and hands it the unmasked aggregate (``aggregate_fit``).
:class:`SecAggRound` drives that workflow once per training round of our own round loop:

1. our Message-API strategy configures the round as usual (``configure_train``: which sites,
   weights, instructions, FedProx's ``proximal-mu``); a one-round legacy strategy
   (:class:`_OneRound`) hands those messages to the workflow as ``FitIns``;
2. the workflow runs the protocol on our grid; each site (see :mod:`client.secagg`) trains,
   and uploads its update ``local - global`` multiplied by ``weight / secagg_max_weight`` (the
   weight is the strategy's ``weighted_by_key`` metric, normally ``num-examples``),
   quantized and masked; the server adds the masked vectors and removes the masks, which
   yields ``sum_i w_i * update_i / sum_i w_i`` and nothing per site;
3. the global weights plus that average update go to our strategy's ``aggregate_train``
   as every site's reply, with the site's own (clear-text) metrics: FedAvg and FedProx
   return it, FedAdam takes its step on it. Strategies that need individual updates
   (FedMedian, FedTrimmedAvg) are refused by the configuration.

Replies are sorted per site as in :mod:`server.rounds` (ok / error / missing) and the round
fails with :class:`~server.rounds.FederationError` with fewer than ``min_sites`` sites, or
when the protocol halts (too few sites left to unmask).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from amlp_core import protocol as P
from amlp_core.config import SECAGG_MODULUS, FederationConfig
from server.rounds import (
    FederationError,
    RoundOutcome,
    ServerRound,
    check_finite,
    check_outcome,
    collect,
    start_round,
)

log = logging.getLogger(__name__)
# Flower's workflow reads the round and the weights from these records of the context state
# (flwr.server.workflow.constant MAIN_CONFIGS_RECORD / MAIN_PARAMS_RECORD / Key.CURRENT_ROUND).
_CONFIGS, _PARAMS, _ROUND = "config", "parameters", "current_round"
ERROR_BOUND = "secagg-error-bound"  # aggregate metric of a SecAgg+ round: see SecAggRound.error_bound


class _OneRound(LegacyStrategy):
    """A legacy strategy for one SecAgg+ round: our FitIns in, the unmasked aggregate out."""

    def __init__(self, fit_ins: list[tuple[ClientProxy, FitIns]]) -> None:
        self.fit_ins = fit_ins
        self.aggregate: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.fit_ins

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        # The workflow put the same unmasked weighted average into every result.
        parameters = results[0][1].parameters
        self.aggregate = parameters_to_ndarrays(parameters)
        return parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _RecordingGrid:
    """The grid, keeping every reply of the round's four stages (to sort them per site)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.replies: list[list[Message]] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.append(replies)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _fit_ins(message: Message, weight_key: str) -> FitIns:
    """The legacy FitIns for one of our train messages (arrays by position, their names in the config)."""
    arrays: ArrayRecord = message.content[P.ARRAYS]
    config = dict(message.content[P.CONFIG])
    config[P.ARRAY_KEYS] = json.dumps(list(arrays.keys()))
    config[P.WEIGHT_KEY] = weight_key
    return FitIns(parameters=compat.arrayrecord_to_parameters(arrays, keep_input=True), config=config)


def _site_replies(grid: _RecordingGrid) -> list[Message]:
    """Per node: its masked-vector reply when it sent one, else its first error reply."""
    chosen: dict[int, Message] = {}
    for stage in grid.replies:
        for reply in stage:
            node = reply.metadata.src_node_id
            if reply.has_error():
                chosen.setdefault(node, reply)
            elif Key.MASKED_PARAMETERS in reply.content.config_records.get(RECORD_KEY_CONFIGS, {}) and (
                node not in chosen or chosen[node].has_error()
            ):
                chosen[node] = reply
    return list(chosen.values())


def _apply(arrays: ArrayRecord, average_update: list[np.ndarray]) -> ArrayRecord:
    """Global weights plus the average update, in each array's own dtype."""
    if len(average_update) != len(arrays):
        raise FederationError(f"SecAgg+ returned {len(average_update)} arrays for a model of {len(arrays)}")
    out = {}
    for (key, array), update in zip(arrays.items(), average_update, strict=True):
        current = array.numpy()
        if update.shape != current.shape:
            raise FederationError(f"SecAgg+ returned shape {update.shape} for {key}, expected {current.shape}")
        value = current.astype(np.float64) + update
        if not np.issubdtype(current.dtype, np.floating):
            value = np.rint(value)
        out[key] = Array(np.ascontiguousarray(value.astype(current.dtype)))
    return ArrayRecord(out)


def _as_reply(reply: Message, averaged: ArrayRecord, metrics: dict[str, Any]) -> Message:
    """A site's reply as our strategy gets it: the secure average (all the server may know) and its metrics."""
    content = RecordDict({P.ARRAYS: averaged, P.METRICS: MetricRecord(metrics)})
    if P.SITE in reply.content.config_records:
        content[P.SITE] = reply.content[P.SITE]
    return Message(content, dst_node_id=reply.metadata.src_node_id, message_type=MessageType.TRAIN)


def _masked_view(reply: Message) -> Message:
    """A site's SecAgg+ reply as the server holds it: its masked vector (weight factor first) and name."""
    masked = reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    content = RecordDict({P.ARRAYS: ArrayRecord([bytes_to_ndarray(b) for b in masked])})
    if P.SITE in reply.content.config_records:
        content[P.SITE] = reply.content[P.SITE]
    return Message(content, dst_node_id=reply.metadata.src_node_id, message_type=MessageType.TRAIN)


class SecAggRound:
    """A drop-in for :func:`server.rounds.train_round` that aggregates with SecAgg+."""

    def __init__(self, fed: FederationConfig) -> None:
        self.fed = fed

    def workflow(self, timeout: float) -> SecAggPlusWorkflow:
        f = self.fed
        return SecAggPlusWorkflow(
            num_shares=float(f.secagg_num_shares),
            reconstruction_threshold=float(f.secagg_reconstruction_threshold),
            max_weight=f.secagg_max_weight,
            clipping_range=f.secagg_clipping_range,
            quantization_range=f.secagg_quantization_range,
            modulus_range=SECAGG_MODULUS,
            timeout=timeout,
        )

    def __call__(self, rnd: ServerRound) -> tuple[ArrayRecord, dict[str, Any], RoundOutcome]:
        """One SecAgg+ training round. The sites' updates and weights stay masked, so the server's
        per-site checks (:mod:`server.validation`) cannot run (the round's norm history is unused): each weight
        is bounded by ``secagg_max_weight`` (the site refuses beyond it) and the unmasked average must be
        finite."""
        grid, strategy, arrays, fed, what = rnd.grid, rnd.strategy, rnd.arrays, rnd.fed, rnd.what
        sent, started = start_round(rnd, train=True)
        if len(sent) * self.fed.secagg_quantization_range >= SECAGG_MODULUS:
            raise FederationError(
                f"{len(sent)} sites x federation.secagg_quantization_range="
                f"{self.fed.secagg_quantization_range} reach SecAgg+'s modulus 2**32: the sum would "
                f"overflow; lower federation.secagg_quantization_range"
            )
        weight_key = str(getattr(strategy, "weighted_by_key", P.NUM_EXAMPLES))
        run_id = getattr(getattr(grid, "run", None), "run_id", 0)
        legacy = _OneRound(
            [(GridClientProxy(m.metadata.dst_node_id, grid, run_id), _fit_ins(m, weight_key)) for m in sent]
        )
        state = RecordDict({_CONFIGS: ConfigRecord({_ROUND: rnd.number}), _PARAMS: arrays})
        context = LegacyContext(
            Context(run_id=run_id, node_id=0, node_config={}, state=state, run_config={}), strategy=legacy
        )
        recording = _RecordingGrid(grid)
        log.info("%s: secure aggregation (SecAgg+) with %d sites", what, len(sent))
        self.workflow(fed.round_timeout)(recording, context)
        outcome = collect(sent, _site_replies(recording), started, rnd.declared.names)
        if legacy.aggregate is None:
            for r in outcome.replies:
                if r.status != P.OK:
                    log.warning("%s: %s %s: %s", what, r.site, r.status, r.error)
            raise FederationError(
                f"{what}: secure aggregation halted (too few sites left to "
                f"unmask the sum; federation.secagg_reconstruction_threshold="
                f"{self.fed.secagg_reconstruction_threshold}); problems: {outcome.problems()}"
            )
        check_outcome(outcome, what, len(sent), fed.min_sites)
        averaged = _apply(arrays, legacy.aggregate)
        check_finite(averaged, what)
        # Every site's reply, as the strategy sees it: the average (all it may know) and its metrics.
        replies = [_as_reply(r.message, averaged, r.metrics) for r in outcome.ok]
        new_arrays, metrics = strategy.aggregate_train(rnd.number, replies)
        if new_arrays is None:
            raise FederationError(f"{what}: the strategy could not aggregate the replies")
        for r in outcome.ok:  # what the server holds of each site (and what the results count as sent)
            r.message = _masked_view(r.message)
        metrics = dict(metrics or {})
        metrics[ERROR_BOUND] = self.error_bound([float(r.metrics.get(weight_key, 0.0)) for r in outcome.ok])
        log.info("%s: SecAgg+ quantization error at most %.3g per parameter", what, metrics[ERROR_BOUND])
        return new_arrays, metrics, outcome

    def error_bound(self, weights: list[float]) -> float:
        """Largest possible difference, per parameter, between the SecAgg+ average and the exact one.

        Each site's weighted update is stochastically rounded to a step of ``2 * clipping /
        quantization_range`` (error below one step); the sum is divided by the sum of the
        weights over ``secagg_max_weight``. A ``secagg_max_weight`` far above the sites'
        weights makes this large: keep it near the largest site's weight.
        """
        f = self.fed
        total = sum(weights) / f.secagg_max_weight
        step = 2 * f.secagg_clipping_range / f.secagg_quantization_range
        return len(weights) * step / total if total > 0 else float("inf")
