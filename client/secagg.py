"""SecAgg+ at the site: the site's update leaves it only masked (``federation.secure_aggregation``).

Flower 1.41 has SecAgg+ only for the legacy API: :func:`flwr.client.mod.secaggplus_mod` speaks
the protocol and, in its "collect masked vectors" stage, calls the app with a *fit* message and
masks the ``FitRes`` parameters it gets back. :func:`secagg_mod` (registered on our train
handler, outermost) puts that mod in front of our Message-API handler:

- a train message that carries Flower's SecAgg+ record (``secaggplus_configs``) goes through
  ``secaggplus_mod``; when it asks for the fit, our handler gets an ordinary train message
  (weights under ``arrays``, instructions under ``config``, rebuilt from the legacy ``FitIns``),
  and its reply is turned into a ``FitRes`` whose parameters are the site's *update*
  (local minus global weights, in the order the server named) and whose ``num_examples`` is
  the site's weight (the metric the server names, normally ``num-examples``);
  ``secaggplus_mod`` then weights, quantizes and masks it, and sends no
  array at all (the masked vector travels as bytes in a ConfigRecord);
- a plain train message (no SecAgg+ record) is refused when the run asks for secure
  aggregation: the site does not send its update in the clear because a server asked it to;
  so is a SecAgg+ setup whose threshold, share count or quantization differ from what the
  run's settings give (a server cannot weaken the protocol on its own);
- everything else passes through unchanged (evaluation, and every message of a run without
  secure aggregation).

Mods listed after this one (e.g. client-side DP clipping) see the ordinary train message and
reply, so they compose with secure aggregation.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from amlp_core import protocol as P
from amlp_core.config import FederationConfig, build_config
from amlp_core.errors import AMLPError

log = logging.getLogger(__name__)
SECAGG_ERROR = 2  # Error.code of a site's refusal to take part in (or to skip) secure aggregation


class _Refusal(Exception):
    """The site will not send this update (it would be clipped or overflow); the message says why."""


class _HandlerFailed(Exception):
    """The train handler answered with an error: passed back as that reply, not as a crash."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def is_secagg_message(msg: Message) -> bool:
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and msg.has_content()
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def _federation(context: Context) -> FederationConfig | None:
    try:
        return build_config(dict(context.run_config)).federation
    except AMLPError:
        return None  # the handler reports the bad configuration itself


def expected_shares(fed: FederationConfig, sites: int) -> tuple[int, int]:
    """(shares, threshold) that SecAggPlusWorkflow derives from the run's settings for ``sites`` sites."""
    shares = round(fed.secagg_num_shares * sites)
    if shares < sites and shares % 2 == 0:
        shares += 1
    if shares <= 2:
        shares = sites
    return shares, max(round(fed.secagg_reconstruction_threshold * shares), 2)


def _check_setup(context: Context, configs: ConfigRecord) -> None:
    """Refuse a setup whose protocol parameters differ from the run's (a weaker threshold above all)."""
    fed = _federation(context)
    if fed is None:
        return
    sites, shares, threshold = (
        int(configs[Key.SAMPLE_NUMBER]),
        int(configs[Key.SHARE_NUMBER]),
        int(configs[Key.THRESHOLD]),
    )
    want = expected_shares(fed, sites)
    ours = {
        Key.CLIPPING_RANGE: fed.secagg_clipping_range,
        Key.TARGET_RANGE: fed.secagg_quantization_range,
        Key.MAX_WEIGHT: fed.secagg_max_weight,
    }
    theirs = {k: configs.get(k) for k in ours}
    if (shares, threshold) != want or any(theirs[k] is None or float(theirs[k]) != float(v) for k, v in ours.items()):
        raise _Refusal(
            f"node {context.node_id}: the server's SecAgg+ setup (threshold {threshold} of {shares} shares "
            f"for {sites} sites, {theirs}) differs from the run's settings (threshold {want[1]} of "
            f"{want[0]}, {ours}); refused"
        )


def _fit_message(msg: Message) -> tuple[Message, list[str], dict[str, np.ndarray], str]:
    """Our ordinary train message from the legacy ``FitIns`` inside a SecAgg+ message."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = json.loads(str(config.pop(P.ARRAY_KEYS)))
    weight_key = str(config.pop(P.WEIGHT_KEY, P.NUM_EXAMPLES))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(arrays):
        raise ValueError(f"SecAgg+ fit message names {len(keys)} arrays but carries {len(arrays)}")
    global_arrays = dict(zip(keys, arrays, strict=True))
    content = RecordDict(
        {P.ARRAYS: ArrayRecord({k: _array(v) for k, v in global_arrays.items()}), P.CONFIG: ConfigRecord(config)}
    )
    return Message(content=content, metadata=msg.metadata), keys, global_arrays, weight_key


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))


def _check_range(context: Context, site: str, deltas: list[np.ndarray], weight: float) -> None:
    """Refuse an update that SecAgg+ would silently clip, or whose weight could overflow the sum."""
    fed = _federation(context)
    if fed is None:
        return
    max_weight, clipping = fed.secagg_max_weight, fed.secagg_clipping_range
    if weight > max_weight:
        raise _Refusal(
            f"site {site}: its weight {weight:g} (training examples) exceeds federation.secagg_max_weight="
            f"{max_weight:g}; the masked sum could overflow: raise federation.secagg_max_weight"
        )
    largest = max((float(np.abs(d).max()) for d in deltas if d.size), default=0.0) * weight / max_weight
    if largest > clipping:
        raise _Refusal(
            f"site {site}: its weighted update reaches {largest:.3g}, beyond "
            f"federation.secagg_clipping_range={clipping:g}; SecAgg+ would clip it and corrupt the "
            f"aggregate: raise federation.secagg_clipping_range"
        )


def _as_fit(call_next: ClientAppCallable) -> ClientAppCallable:
    """``call_next`` seen through the legacy fit interface that ``secaggplus_mod`` expects."""

    def fit(msg: Message, context: Context) -> Message:
        inner, keys, global_arrays, weight_key = _fit_message(msg)
        reply = call_next(inner, context)
        if reply.has_error():
            raise _HandlerFailed(reply)
        local = reply.content[P.ARRAYS]
        site = str(reply.content[P.SITE][P.SITE_NAME]) if P.SITE in reply.content.config_records else "?"
        if set(local.keys()) != set(keys):
            raise _Refusal(f"site {site}: its weights hold other arrays than the server sent: versions differ")
        deltas = [local[k].numpy().astype(np.float64) - global_arrays[k].astype(np.float64) for k in keys]
        metrics = reply.content[P.METRICS]
        weight = metrics[weight_key]  # FitRes.num_examples: what secaggplus_mod weights the update by
        _check_range(context, site, deltas, weight)
        fitres = FitRes(
            status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(deltas), num_examples=weight, metrics={}
        )
        content = compat.fitres_to_recorddict(fitres, keep_input=False)
        # Aggregate numbers and the site's name travel in the clear, as in every round.
        content[P.METRICS] = metrics
        if P.SITE in reply.content.config_records:
            content[P.SITE] = reply.content[P.SITE]
        return Message(content=content, reply_to=msg)

    return fit


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Register first in ``@app.train(mods=[...])``; see the module docstring."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if not is_secagg_message(msg):
        fed = _federation(context)
        if fed is not None and fed.secure_aggregation:
            reason = (
                f"node {context.node_id}: this run uses secure aggregation "
                "(federation.secure_aggregation=true), but the server asked for the update in the clear; "
                "refused"
            )
            log.error(reason)
            return Message(error=Error(code=SECAGG_ERROR, reason=reason), reply_to=msg)
        return call_next(msg, context)
    try:
        configs = msg.content[RECORD_KEY_CONFIGS]
        if configs.get(Key.STAGE) == Stage.SETUP:
            _check_setup(context, configs)
        return secaggplus_mod(msg, context, _as_fit(call_next))
    except _HandlerFailed as failed:
        return Message(error=failed.reply.error, reply_to=msg)
    except _Refusal as refusal:
        log.error("%s", refusal)
        return Message(error=Error(code=SECAGG_ERROR, reason=str(refusal)), reply_to=msg)
