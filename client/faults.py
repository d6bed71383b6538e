"""The ClientApp mod that makes a simulated site misbehave as ``federation.inject`` says (amlp_core/faults.py).

A deployed site (a node with a site file) never obeys it: the spec comes from whoever submits the run.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, Context, Error, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from amlp_core import protocol as P
from amlp_core.config import build_config
from amlp_core.faults import WEIGHT_FAULTS, Fault, corrupt, parse_faults
from client.site import SITE_CONFIG, site_config

log = logging.getLogger(__name__)
FAULT_ERROR = 2  # Error.code of an injected crash


def _fault(msg: Message, context: Context) -> tuple[Fault | None, str]:
    """The fault this message triggers at this site (None for most), and the site's name."""
    if SITE_CONFIG in context.node_config or msg.metadata.message_type == MessageType.QUERY:
        return None, ""
    faults = parse_faults(build_config(dict(context.run_config)).federation.inject)
    if not faults or P.CONFIG not in msg.content.config_records:
        return None, ""
    name = site_config(context.run_config, context.node_config)[0].site.name
    config = msg.content[P.CONFIG]
    when = "evaluate" if msg.metadata.message_type == MessageType.EVALUATE else str(config.get(P.PHASE, ""))
    round_ = int(config.get(P.GLOBAL_ROUND, 0))
    return next((f for f in faults if f.applies(name, when, round_)), None), name


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the site's handler, then (or instead) do what the injected fault says."""
    fault, site = _fault(msg, context)
    if fault is None:
        return call_next(msg, context)
    log.warning("site %s: injected fault %s", site, fault.kind)
    if fault.kind == "crash":
        return Message(error=Error(code=FAULT_ERROR, reason=f"site {site}: injected fault: crash"), reply_to=msg)
    if fault.kind == "offline":  # answer after the server stopped waiting for this round
        time.sleep(build_config(dict(context.run_config)).federation.round_timeout + 2)
        return Message(error=Error(code=FAULT_ERROR, reason=f"site {site}: injected fault: offline"), reply_to=msg)
    if fault.kind == "slow":
        time.sleep(fault.value)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if fault.kind in WEIGHT_FAULTS and P.ARRAYS in reply.content.array_records:
        weights = corrupt(
            fault, msg.content[P.ARRAYS].to_torch_state_dict(), reply.content[P.ARRAYS].to_torch_state_dict()
        )
        reply.content[P.ARRAYS] = ArrayRecord(weights)
    if fault.kind == "inflate":
        metrics = dict(reply.content[P.METRICS])
        metrics[P.NUM_EXAMPLES] = fault.value
        reply.content[P.METRICS] = MetricRecord(metrics)
    return reply
