"""The hospital's Flower ClientApp: messages in, amlp_core calls, weights and aggregate metrics out.

One train handler serves both phases (the instruction ``phase`` says which), so that
Flower's strategies and their wrappers work unchanged. A site problem (bad data, refused
round, a defect) is answered with an error reply that names the site and the kind of problem,
never its text: paths, case ids and tracebacks stay in the site's own log. The server counts it
as that site's failure and the other sites go on.
"""

from __future__ import annotations

import json
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from amlp_core import protocol as P
from amlp_core.errors import AMLPError, CheckpointError, ConfigError, DataError
from amlp_core.privacy.ledger import PrivacyBudgetExceeded, PrivacyError
from client import tasks
from client.faults import fault_mod
from client.secagg import secagg_mod
from client.site import Site, get_site, site_config
from client.terms import TermsRefused

log = logging.getLogger(__name__)
SITE_ERROR = 1  # Error.code of a site's refusal or data problem

app = ClientApp()


def _site(context: Context) -> Site:
    return get_site(context.run_id, context.node_id, context.run_config, context.node_config)


def _site_record(site: Site) -> ConfigRecord:
    names = {str(k): v for k, v in site.raw.class_names.items()}
    return ConfigRecord({P.SITE_NAME: site.name, P.CLASS_NAMES: json.dumps(names)})


def _site_name(context: Context) -> str:
    try:
        return site_config(context.run_config, context.node_config)[0].site.name
    except AMLPError:
        return f"node {context.node_id}"


#: How a site's error is described to the server: the kind only, never its text (which may hold a path,
#: a case id or a value of a scan). The text stays in the site's own log.
ERROR_KINDS = (
    (DataError, "data problem"),
    (CheckpointError, "checkpoint problem"),
    (ConfigError, "configuration problem"),
)


def outgoing_reason(site: str, error: Exception) -> str:
    """What the server is told of ``error``: the site, the kind of problem and how many; a refused round
    (a disagreement on the protocol or the plan), a run that falls short of the site's terms and a refusal
    to overspend the privacy budget (whose epsilon the site reports anyway) in full: they say nothing of
    the data."""
    if isinstance(error, (tasks.RoundRefused, PrivacyBudgetExceeded, TermsRefused)):
        return f"site {site}: {error}"
    kind = next((k for cls, k in ERROR_KINDS if isinstance(error, cls)), None)
    if kind is None and isinstance(error, AMLPError):
        kind = "privacy ledger problem" if isinstance(error, PrivacyError) else "site problem"
    kind = kind or f"unexpected {type(error).__name__}"
    count = getattr(error, "count", 1)
    return f"site {site}: {kind} ({count} {'problem' if count == 1 else 'problems'}; details in the site's own log)"


def _error_reply(msg: Message, context: Context, error: Exception) -> Message:
    """The error reply for ``error``; its full text (and, for a defect, the traceback) goes to the local log."""
    name = _site_name(context)
    if isinstance(error, AMLPError):
        log.error("site %s: %s", name, error)
    else:
        log.exception("site %s: unexpected error", name)
    return Message(error=Error(code=SITE_ERROR, reason=outgoing_reason(name, error)), reply_to=msg)


# secagg_mod first: the mods after it see ordinary train messages (client/secagg.py); fault_mod only acts in
# a simulation given federation.inject (client/faults.py).
@app.train(mods=[secagg_mod, fault_mod])
def train(msg: Message, context: Context) -> Message:
    """Pretraining or fine-tuning round: global weights in, local weights and metrics out."""
    try:
        site = _site(context)
        ins = tasks.Instructions.parse(msg.content[P.CONFIG])
        global_state = msg.content[P.ARRAYS].to_torch_state_dict()
        if ins.phase == P.PRETRAIN:
            state, metrics = tasks.pretrain_round(site, global_state, ins)
        elif ins.phase == P.FINETUNE:
            state, metrics = tasks.finetune_round(site, global_state, ins)
        else:
            raise tasks.RoundRefused(f"unknown phase {ins.phase!r}: server and site versions differ")
    except Exception as e:  # noqa: BLE001 - every failure becomes an error reply that leaks nothing
        return _error_reply(msg, context, e)
    content = RecordDict({P.ARRAYS: ArrayRecord(state), P.METRICS: MetricRecord(metrics), P.SITE: _site_record(site)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The site's answers at the start of a run. Without a plan in the message: its fingerprint (aggregates
    only), which the server plans the run from. With the plan: its declaration, how many cases stand behind
    each kind of reply (counts only), which bound every ``num-examples`` it reports later
    (server/validation.py)."""
    try:
        site = _site(context)
        config = msg.content[P.CONFIG] if P.CONFIG in msg.content.config_records else {}
        if P.PLAN not in config:
            assert site.raw.fingerprint is not None
            answer = {P.FINGERPRINT: ConfigRecord(site.raw.fingerprint.to_record())}
        else:
            site.use_plan(tasks.server_plan(config))
            answer = {P.METRICS: MetricRecord(tasks.declaration(site))}
    except Exception as e:  # noqa: BLE001 - every failure becomes an error reply that leaks nothing
        return _error_reply(msg, context, e)
    return Message(content=RecordDict({**answer, P.SITE: _site_record(site)}), reply_to=msg)


@app.evaluate(mods=[fault_mod])
def evaluate(msg: Message, context: Context) -> Message:
    """Dice of the global segmentation model on the site's test cases."""
    try:
        site = _site(context)
        site.use_plan(tasks.server_plan(msg.content[P.CONFIG]))
        round_ = int(msg.content[P.CONFIG].get(P.GLOBAL_ROUND, 0))  # (the site's TensorBoard step)
        metrics = tasks.evaluate_round(site, msg.content[P.ARRAYS].to_torch_state_dict(), round_)
    except Exception as e:  # noqa: BLE001 - every failure becomes an error reply that leaks nothing
        return _error_reply(msg, context, e)
    return Message(content=RecordDict({P.METRICS: MetricRecord(metrics), P.SITE: _site_record(site)}), reply_to=msg)
