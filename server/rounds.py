"""One federated round, made explicit and bounded.

Flower's own ``Strategy.start`` waits forever for missing nodes and silently keeps the old
model when no reply arrives. Here every round (1) waits for ``min_sites`` connected sites
with a deadline, (2) sends through the strategy with a timeout, (3) sorts the replies into
ok / error / missing per site, (4) fails the run, naming every site's problem, when fewer
than ``min_sites`` sites answered, and (5) aggregates the others in a fixed order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from amlp_core.errors import AMLPError
from fedamlp import protocol as P

log = logging.getLogger(__name__)


class FederationError(AMLPError):
    """The federation cannot go on (too few sites); the message says which sites failed and why."""


@dataclass
class SiteReply:
    site: str
    node_id: int
    status: str  # ok | error | missing
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    message: Message | None = None


@dataclass
class RoundOutcome:
    replies: list[SiteReply]
    seconds: float

    @property
    def ok(self) -> list[SiteReply]:
        return [r for r in self.replies if r.status == "ok"]

    def problems(self) -> str:
        bad = [r for r in self.replies if r.status != "ok"]
        return "; ".join(f"{r.site}: {r.status}{' - ' + r.error if r.error else ''}" for r in bad) or "none"


def wait_for_sites(grid: Grid, needed: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Node ids once at least ``needed`` sites are connected; FederationError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if time.monotonic() >= deadline:
            raise FederationError(
                f"only {len(nodes)} of the {needed} sites needed (federation.min_sites) connected "
                f"within {timeout:.0f} s (federation.connect_timeout)"
            )
        time.sleep(poll)


def _site_name(reply: Message) -> str:
    if reply.has_content() and P.SITE in reply.content.config_records:
        return str(reply.content[P.SITE][P.SITE_NAME])
    return f"node {reply.metadata.src_node_id}"


def collect(sent: list[Message], replies: Iterable[Message], started: float) -> RoundOutcome:
    """Sort replies into ok / error / missing, one entry per site that was asked."""
    by_node = {r.metadata.src_node_id: r for r in replies}
    out = []
    for message in sent:
        node = message.metadata.dst_node_id
        reply = by_node.get(node)
        if reply is None:
            out.append(SiteReply(f"node {node}", node, "missing", error="no reply before the round timeout"))
        elif reply.has_error():
            reason = reply.error.reason or f"error code {reply.error.code}"
            site = reason.split(":", 1)[0].removeprefix("site ") if reason.startswith("site ") else f"node {node}"
            out.append(SiteReply(site, node, "error", error=reason, message=reply))
        else:
            metrics = dict(reply.content[P.METRICS]) if P.METRICS in reply.content.metric_records else {}
            out.append(SiteReply(_site_name(reply), node, "ok", metrics=metrics, message=reply))
    out.sort(key=lambda r: r.site)  # a fixed order: aggregation sums in the same order every run
    return RoundOutcome(out, time.monotonic() - started)


def train_round(
    grid: Grid,
    strategy: Strategy,
    rnd: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    min_sites: int,
    connect_timeout: float,
    round_timeout: float,
) -> tuple[ArrayRecord, dict[str, Any], RoundOutcome]:
    """Send a training round through ``strategy`` and aggregate it, or raise FederationError."""
    wait_for_sites(grid, min_sites, connect_timeout)
    started = time.monotonic()
    sent = list(strategy.configure_train(rnd, arrays, config, grid))
    outcome = collect(sent, grid.send_and_receive(sent, timeout=round_timeout), started)
    for r in outcome.replies:
        if r.status != "ok":
            log.warning("round %d: %s %s: %s", rnd, r.site, r.status, r.error)
    if len(outcome.ok) < min_sites:
        raise FederationError(
            f"{config[P.PHASE]} round {rnd}: only {len(outcome.ok)} of {len(sent)} sites "
            f"replied (federation.min_sites={min_sites}); problems: {outcome.problems()}"
        )
    new_arrays, metrics = strategy.aggregate_train(rnd, [r.message for r in outcome.ok])
    if new_arrays is None:
        raise FederationError(f"{config[P.PHASE]} round {rnd}: the strategy could not aggregate the replies")
    return new_arrays, dict(metrics or {}), outcome


def evaluate_round(
    grid: Grid,
    strategy: Strategy,
    rnd: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    min_sites: int,
    connect_timeout: float,
    round_timeout: float,
) -> tuple[dict[str, Any], RoundOutcome]:
    """Federated evaluation of ``arrays``; FederationError with fewer than ``min_sites`` answers."""
    wait_for_sites(grid, min_sites, connect_timeout)
    started = time.monotonic()
    sent = list(strategy.configure_evaluate(rnd, arrays, config, grid))
    outcome = collect(sent, grid.send_and_receive(sent, timeout=round_timeout), started)
    if len(outcome.ok) < min_sites:
        raise FederationError(
            f"evaluation round {rnd}: only {len(outcome.ok)} of {len(sent)} sites replied "
            f"(federation.min_sites={min_sites}); problems: {outcome.problems()}"
        )
    metrics = strategy.aggregate_evaluate(rnd, [r.message for r in outcome.ok])
    return dict(metrics or {}), outcome
