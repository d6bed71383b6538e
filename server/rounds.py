"""One federated round, made explicit and bounded.

Flower's own ``Strategy.start`` waits forever for missing nodes and silently keeps the old
model when no reply arrives. Here every round (1) waits for ``min_sites`` connected sites
with a deadline, asking new sites what data they hold (:class:`server.validation.Declarations`),
(2) sends through the strategy with a timeout, (3) sorts the replies into ok / error / missing
per site and rejects those that fail the server's checks (:mod:`server.validation`), (4) fails the
run, naming every site's problem, when fewer than ``min_sites`` sites are left, and (5)
aggregates the others in a fixed order, refusing an aggregate that is not finite.
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

from amlp_core import protocol as P
from amlp_core.config import FederationConfig
from amlp_core.errors import AMLPError
from server.validation import Declarations, NormHistory, check_replies, nonfinite_key

log = logging.getLogger(__name__)


class FederationError(AMLPError):
    """The federation cannot go on (too few sites); the message says which sites failed and why."""


@dataclass
class SiteReply:
    site: str
    node_id: int
    status: str  # P.OK | P.ERROR | P.MISSING | P.REJECTED
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    message: Message | None = None


@dataclass
class RoundOutcome:
    replies: list[SiteReply]
    seconds: float

    @property
    def ok(self) -> list[SiteReply]:
        return [r for r in self.replies if r.status == P.OK]

    def problems(self) -> str:
        bad = [r for r in self.replies if r.status != P.OK]
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


def error_reason(reason: str, limit: int = 300) -> str:
    """A site's error as one line for the record: a traceback (a crashed worker of Flower's simulation
    engine sends kilobytes of one) becomes its last line, the exception, and the line is cut at ``limit``."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    line = lines[-1] if len(lines) > 1 and "Traceback" in reason else " ".join(lines)
    return line if len(line) <= limit else line[:limit] + "..."


def collect(
    sent: list[Message], replies: Iterable[Message], started: float, names: dict[int, str] | None = None
) -> RoundOutcome:
    """Sort replies into ok / error / missing, one entry per site that was asked; ``names`` (node id ->
    site, from the sites' declarations) names a site that did not answer."""
    by_node = {r.metadata.src_node_id: r for r in replies}
    out = []
    for message in sent:
        node = message.metadata.dst_node_id
        reply = by_node.get(node)
        if reply is None:
            name = (names or {}).get(node, f"node {node}")
            out.append(SiteReply(name, node, P.MISSING, error="no reply before the round timeout"))
        elif reply.has_error():
            reason = error_reason(reply.error.reason or f"error code {reply.error.code}")
            named = (names or {}).get(node, f"node {node}")  # (a crash in Flower's engine names no site)
            site = reason.split(":", 1)[0].removeprefix("site ") if reason.startswith("site ") else named
            out.append(SiteReply(site, node, P.ERROR, error=reason, message=reply))
        else:
            metrics = dict(reply.content[P.METRICS]) if P.METRICS in reply.content.metric_records else {}
            out.append(SiteReply(_site_name(reply), node, P.OK, metrics=metrics, message=reply))
    out.sort(key=lambda r: r.site)  # a fixed order: aggregation sums in the same order every run
    return RoundOutcome(out, time.monotonic() - started)


@dataclass(frozen=True)
class ServerRound:
    """One round as the server runs it: to whom it goes and with what (the global ``arrays`` and the
    ``instructions``), through which strategy, and what judges the replies (the sites' declarations and,
    for training, the run's history of update norms)."""

    grid: Grid
    strategy: Strategy
    number: int
    arrays: ArrayRecord
    instructions: ConfigRecord
    fed: FederationConfig
    declared: Declarations
    history: NormHistory | None = None

    @property
    def phase(self) -> str:
        return str(self.instructions[P.PHASE])

    @property
    def what(self) -> str:
        return f"{self.phase} round {self.number}"


def start_round(rnd: ServerRound, train: bool) -> tuple[list[Message], float]:
    """Wait for the sites, ask the new ones for their fingerprint and declaration, and build the round's
    messages (not sent yet) for every site but those refused by the plan; returns them and the round's
    start time."""
    nodes = wait_for_sites(rnd.grid, rnd.fed.min_sites, rnd.fed.connect_timeout)
    rnd.declared.ask(rnd.grid, nodes, rnd.instructions)
    started = time.monotonic()
    configure = rnd.strategy.configure_train if train else rnd.strategy.configure_evaluate
    messages = configure(rnd.number, rnd.arrays, rnd.instructions, rnd.grid)
    return [m for m in messages if m.metadata.dst_node_id not in rnd.declared.refused], started


def exchange(rnd: ServerRound, sent: list[Message], started: float) -> RoundOutcome:
    """Send the round's messages and sort the replies that come back within the round timeout."""
    replies = rnd.grid.send_and_receive(sent, timeout=rnd.fed.round_timeout)
    return collect(sent, replies, started, rnd.declared.names)


def check_outcome(outcome: RoundOutcome, what: str, sent: int, min_sites: int) -> None:
    """Log every site's problem; FederationError when fewer than ``min_sites`` replies are left."""
    for r in outcome.replies:
        if r.status != P.OK:
            log.warning("%s: %s %s: %s", what, r.site, r.status, r.error)
    if len(outcome.ok) < min_sites:
        raise FederationError(
            f"{what}: only {len(outcome.ok)} of {sent} sites replied acceptably "
            f"(federation.min_sites={min_sites}); problems: {outcome.problems()}"
        )


def check_finite(arrays: ArrayRecord, what: str) -> None:
    """FederationError when the aggregate holds a non-finite value: it is neither saved nor sent."""
    key = nonfinite_key(arrays)
    if key is not None:
        raise FederationError(f"{what}: the aggregate's {key} is not finite; it is neither saved nor sent")


def train_round(rnd: ServerRound) -> tuple[ArrayRecord, dict[str, Any], RoundOutcome]:
    """Send a training round through its strategy, check the replies (against the run's earlier rounds too)
    and aggregate them, or raise FederationError."""
    sent, started = start_round(rnd, train=True)
    outcome = exchange(rnd, sent, started)
    f = rnd.fed
    check_replies(
        outcome.replies,
        rnd.arrays,
        rnd.phase,
        rnd.declared,
        f.update_norm_factor,
        f.update_min_cosine,
        clip=f.update_clip_factor,
        history=rnd.history,
        weight_ratio=f.max_weight_ratio,
    )
    check_outcome(outcome, rnd.what, len(sent), f.min_sites)
    new_arrays, metrics = rnd.strategy.aggregate_train(rnd.number, [r.message for r in outcome.ok])
    if new_arrays is None:
        raise FederationError(f"{rnd.what}: the strategy could not aggregate the replies")
    check_finite(new_arrays, rnd.what)
    return new_arrays, dict(metrics or {}), outcome


def evaluate_round(rnd: ServerRound) -> tuple[dict[str, Any], RoundOutcome]:
    """Federated evaluation of the round's arrays at the sites that declared test cases (none: no replies,
    and the caller says the evaluation was skipped); FederationError with fewer acceptable answers than
    ``min_sites`` (or than the sites asked, when fewer hold test cases)."""
    sent, started = start_round(rnd, train=False)
    sent = [m for m in sent if rnd.declared.counts.get(m.metadata.dst_node_id, {}).get(P.DECLARED_TEST) != 0]
    if not sent:
        return {}, RoundOutcome([], 0.0)
    outcome = exchange(rnd, sent, started)
    check_replies(outcome.replies, None, "evaluate", rnd.declared, 0.0)
    check_outcome(outcome, f"evaluation round {rnd.number}", len(sent), min(rnd.fed.min_sites, len(sent)))
    metrics = rnd.strategy.aggregate_evaluate(rnd.number, [r.message for r in outcome.ok])
    return dict(metrics or {}), outcome
