"""The server's checks on every site's reply before it is averaged.

A reply is accepted only when

- its weights have exactly the global model's keys, shapes and dtypes, and every value is finite;
- its ``num-examples`` is a positive whole number no larger than the site declared for that kind
  of round at the start of the run (its answer to the server's QUERY message, :class:`Declarations`);
- its update (reply minus global weights) has a norm of at most ``federation.update_norm_factor``
  times the median norm of the round's accepted replies, and points the way the others do: its
  cosine with the coordinate-wise median update is at least ``federation.update_min_cosine``
  (both need three sites or more; a factor of 0 or a cosine of -1 turns that check off).

A refused reply becomes that site's failure (status ``rejected``, with the reason); the round goes
on with the others if ``federation.min_sites`` remain. A non-finite average (:func:`nonfinite_key`)
fails the round (:mod:`server.rounds`), so that it is never saved or sent. Under secure aggregation
the server sees only the masked sum: the per-site checks cannot run there, the aggregate check can.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from amlp_core import protocol as P
from amlp_core.config import PlanConfig
from amlp_core.data.plan import Fingerprint, PlanError, decide_plan, fit_problem
from amlp_core.engine.lesions import EMPTY_CASES, EMPTY_HITS, EMPTY_SHARE, LESION_CASES, LESION_DICE

if TYPE_CHECKING:
    from server.rounds import SiteReply

log = logging.getLogger(__name__)
#: In the round's record of a reply whose update was clipped: the factor it was scaled by.
CLIPPED = "update_clipped"
#: Norm checks need a median that one site cannot move: three accepted replies at least.
MIN_SITES_FOR_NORM = 3


@dataclass
class Declarations:
    """What each node told the server at the start of the run.

    Nodes are asked twice, each once: first for their fingerprint (a QUERY without a plan:
    :class:`~amlp_core.data.plan.Fingerprint`, aggregates only), which the run's plan is decided from
    (:meth:`decide`) and which every node is checked against (a node whose data do not fit is ``refused``
    and sent nothing more); then, with the plan, for their counts ``{node_id: {DECLARED_*: count}}``. A
    node that joins later, or did not answer in time, is asked again before the next round. The first
    answer may wait for a site to start and read its data: ``timeout`` should cover that.
    """

    timeout: float
    # The declared count that bounds each kind of reply (protocol.declared_for: the run's semi-supervised weighting).
    declared_for: dict[str, str] = field(default_factory=lambda: dict(P.DECLARED_FOR))
    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    problems: dict[int, str] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # the site names they gave (to name a missing site)
    fingerprints: dict[int, Fingerprint] = field(default_factory=dict)
    plan: PlanConfig | None = None
    refused: dict[int, str] = field(default_factory=dict)  # nodes whose data do not fit the plan, and why

    def _query(self, grid: Grid, nodes: list[int], config: ConfigRecord, what: str) -> dict[int, Message]:
        """Send a QUERY to ``nodes``; the good replies by node (a missing or error reply becomes a problem)."""
        sent = [Message(RecordDict({P.CONFIG: config}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(sent, timeout=self.timeout)}
        good = {}
        for node in nodes:
            reply = replies.get(node)
            if reply is None:
                self.problems[node] = f"did not {what} (no answer within {self.timeout:.0f} s)"
            elif reply.has_error():
                self.problems[node] = f"did not {what}: {reply.error.reason}"
            else:
                self.problems.pop(node, None)
                if P.SITE in reply.content.config_records:
                    self.names[node] = str(reply.content[P.SITE][P.SITE_NAME])
                good[node] = reply
        return good

    def site(self, node: int) -> str:
        return f"site {self.names[node]}" if node in self.names else f"node {node}"

    def ask_fingerprints(self, grid: Grid, nodes: list[int]) -> None:
        """Ask the ``nodes`` without a fingerprint for theirs; once the plan is decided, a new node whose data
        do not fit it is refused."""
        new = [n for n in nodes if n not in self.fingerprints and n not in self.refused]
        if not new:
            return
        for node, reply in self._query(grid, new, ConfigRecord(), "send its fingerprint").items():
            try:
                record = dict(reply.content[P.FINGERPRINT])
                self.fingerprints[node] = Fingerprint.from_record(record, self.site(node))
            except (KeyError, TypeError, ValueError, PlanError) as e:
                self.problems[node] = f"sent an unreadable fingerprint ({type(e).__name__}: {e})"
                continue
            if self.plan is not None:
                self._check_fit(node)

    def _check_fit(self, node: int) -> None:
        assert self.plan is not None
        problem = fit_problem(self.fingerprints[node], self.plan)
        if problem:
            self.refused[node] = str(problem)
            log.warning("%s is refused: its data do not fit the run's plan: %s", self.site(node), problem)

    def decide(self, base: PlanConfig, budget: Sequence[int], step: int) -> PlanConfig:
        """The run's plan: ``base`` when it is decided (a resumed run's, or the run config's), else the one
        :func:`~amlp_core.data.plan.decide_plan` makes of the fingerprints, the input size within ``budget``
        (``model.img_size``) in multiples of ``step``; every node is checked against it.

        Raises:
            PlanError: no fingerprint to decide from.
        """
        if base.decided:
            self.plan = base
        else:
            fingerprints = {self.site(n): fp for n, fp in sorted(self.fingerprints.items())}
            self.plan = decide_plan(fingerprints, base, budget, step)
        for node in sorted(self.fingerprints):
            self._check_fit(node)
        return self.plan

    def ask(self, grid: Grid, nodes: list[int], config: ConfigRecord) -> None:
        """Query the ``nodes`` not yet asked (new ones first for their fingerprint, checked against the
        plan); their answers (or why there is none) are kept."""
        if self.plan is not None:
            self.ask_fingerprints(grid, nodes)
        new = [n for n in nodes if n not in self.counts and n not in self.refused]
        if not new:
            return
        for node, reply in self._query(grid, new, config, "declare its data").items():
            try:
                self.counts[node] = _declaration(reply)
            except (KeyError, TypeError, ValueError) as e:
                self.problems[node] = f"sent an unreadable declaration ({type(e).__name__}: {e})"

    def weight_cap(self, node: int, kind: str, ratio: float) -> float | None:
        """The most ``num-examples`` node ``node`` is weighted by in a reply of ``kind``: ``ratio`` times the
        median of what the *other* sites declared (a figure it cannot inflate); None with no other site or
        ``ratio`` 0."""
        others = [c[self.declared_for[kind]] for n, c in self.counts.items() if n != node]
        if ratio <= 0 or not others:
            return None
        return max(1.0, ratio * float(np.median(others)))

    def bound(self, node: int, kind: str) -> int:
        """The largest ``num-examples`` node ``node`` may report in a reply of ``kind``
        (:attr:`declared_for`); ValueError when it declared none."""
        if node not in self.counts:
            raise ValueError(self.problems.get(node, "did not declare its data at the start of the run"))
        return self.counts[node][self.declared_for[kind]]


def _declaration(reply: Message) -> dict[str, int]:
    metrics = reply.content[P.METRICS]
    out = {}
    for key in (P.DECLARED_TRAIN, P.DECLARED_LABELLED, P.DECLARED_TEST):
        value = metrics[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{key}={value!r} is not a count")
        out[key] = value
    return out


def _num_examples(value: Any, bound: int) -> str:
    """Why ``value`` is not an acceptable ``num-examples`` (empty when it is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"num-examples={value!r} is not a number"
    if value != int(value) or value <= 0:
        return f"num-examples={value!r} is not a positive whole number"
    if value > bound:
        return f"num-examples={value:g} exceeds the {bound} cases the site declared at the start of the run"
    return ""


def _weights_problem(reply: Message, reference: dict[str, np.ndarray]) -> str:
    """Why the reply's weights do not match the global model's (empty when they do)."""
    if P.ARRAYS not in reply.content.array_records:
        return "the reply carries no weights"
    arrays = reply.content[P.ARRAYS]
    missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"weights differ from the global model's (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, ref in reference.items():
        value = arrays[key].numpy()
        if value.shape != ref.shape or value.dtype != ref.dtype:
            return f"{key} is {value.dtype}{list(value.shape)}, the global model's {ref.dtype}{list(ref.shape)}"
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return f"{key} holds non-finite values"
    return ""


def _dice_problem(metrics: dict[str, Any]) -> str:
    """Why an evaluation reply's Dice values are impossible (empty when each is NaN or in [0, 1])."""
    for key, value in metrics.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key.startswith("dice") and not (number and (math.isnan(value) or 0 <= value <= 1)):
            return f"{key}={value!r} is not a Dice score"
    return ""


def _lesion_problem(metrics: dict[str, Any]) -> str:
    """Why an evaluation reply's lesion metrics are impossible: the counts must be whole, cover exactly
    its test cases (``num-examples``, bounded by the site's declaration), and the values lie in [0, 1]; a
    site cannot weigh its lesion Dice above its own test cases."""
    if LESION_CASES not in metrics and EMPTY_CASES not in metrics:
        return ""
    counts = {k: metrics.get(k) for k in (LESION_CASES, EMPTY_CASES, EMPTY_HITS)}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
            return f"{key}={value!r} is not a count"
    if (
        counts[LESION_CASES] + counts[EMPTY_CASES] != metrics.get(P.NUM_EXAMPLES)
        or counts[EMPTY_HITS] > counts[EMPTY_CASES]
    ):
        return f"lesion counts {counts} do not add up to its {metrics.get(P.NUM_EXAMPLES)} test cases"
    for key in (LESION_DICE, EMPTY_SHARE):
        value = metrics.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isnan(value) or 0 <= value <= 1):
            return f"{key}={value!r} is not a share"
    return ""


def update_vector(reply: Message, reference: dict[str, np.ndarray]) -> np.ndarray:
    """The reply's update (its weights minus the global ones) over the floating-point arrays, flat
    ``[P]`` float64 (a reply that passed the shape checks)."""
    arrays = reply.content[P.ARRAYS]
    parts = [
        (arrays[k].numpy().astype(np.float64) - ref.astype(np.float64)).ravel()
        for k, ref in reference.items()
        if ref.dtype.kind == "f"
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclass
class NormHistory:
    """What the server remembers of the run's rounds for the checks: whether it has warned that its rounds are
    too small to judge an update by the others."""

    warned: bool = False


def reference_norm(norms: Sequence[float]) -> tuple[float | None, str]:
    """The norm a round's updates are measured against, and how it was found: the median of three or more,
    which no one site moves; None with fewer (nothing a hostile site cannot move: two honest sites of
    different sizes were measured 100x apart in a first round, so the smaller of two would reject the
    larger honest one)."""
    if len(norms) >= MIN_SITES_FOR_NORM:
        return float(np.median(norms)), "the round's median"
    return None, ""


def check_replies(
    replies: list[SiteReply],
    global_arrays: ArrayRecord | None,
    kind: str,
    declared: Declarations,
    factor: float,
    min_cosine: float = -1.0,
    clip: float = 0.0,
    history: NormHistory | None = None,
    weight_ratio: float = 0.0,
) -> None:
    """Mark every unacceptable ``ok`` reply of a round as ``rejected``, with the reason, in place, and clip
    the accepted updates that are long against the round's reference norm (:func:`reference_norm`).

    Args:
        replies: the round's replies (:func:`server.rounds.collect`).
        global_arrays: the weights the round was sent (None for an evaluation round: no weights back).
        kind: ``pretrain`` | ``finetune`` (training) or ``evaluate``.
        declared: the sites' declarations (bounds on ``num-examples``).
        factor: ``federation.update_norm_factor`` (0: no norm bound): longer updates are rejected.
        min_cosine: ``federation.update_min_cosine`` (-1: no direction check; it needs three replies).
        clip: ``federation.update_clip_factor`` (0: none): an accepted update longer than this times the
            reference is scaled down to it before aggregation, so one site moves the average by a bounded step.
        history: the run's :class:`NormHistory` (the warning for rounds too small to judge, said once).
        weight_ratio: ``federation.max_weight_ratio`` (0: none): an accepted reply's ``num-examples``, the
            weight of its average, is capped at :meth:`Declarations.weight_cap`.
    """
    reference = None if global_arrays is None else {k: v.numpy() for k, v in global_arrays.items()}
    for r in replies:
        if r.status != P.OK or r.message is None:
            continue
        try:
            why = _num_examples(r.metrics.get(P.NUM_EXAMPLES), declared.bound(r.node_id, kind))
        except ValueError as e:
            why = str(e)
        if not why and reference is not None:
            why = _weights_problem(r.message, reference)
        if not why and kind == "evaluate":
            why = _dice_problem(r.metrics) or _lesion_problem(r.metrics)
        if why:
            _reject(r, why)
        elif kind != "evaluate":
            _cap_weight(r, declared.weight_cap(r.node_id, kind, weight_ratio))
    if reference is None:
        return
    accepted = [r for r in replies if r.status == P.OK and r.message is not None]
    if not accepted:
        return
    if len(accepted) < MIN_SITES_FOR_NORM and history is not None and not history.warned:
        log.warning(
            "NO DEFENCE against a hostile site in this %s round: with %d acceptable replies (fewer than %d) the "
            "server cannot judge an update's length or direction by the others; only each site's weight is "
            "capped (federation.max_weight_ratio). Run with three sites or more to have them checked",
            kind,
            len(accepted),
            MIN_SITES_FOR_NORM,
        )
        history.warned = True
    updates = {r.site: update_vector(r.message, reference) for r in accepted}
    norms = {site: float(np.linalg.norm(u)) for site, u in updates.items()}
    ref, how = reference_norm(list(norms.values()))
    if factor > 0 and ref:
        for r in accepted:
            if norms[r.site] > factor * ref:
                _reject(
                    r,
                    f"update norm {norms[r.site]:.3g} is over {factor:g} x {how} {ref:.3g} "
                    "(federation.update_norm_factor)",
                )
    accepted = [r for r in accepted if r.status == P.OK]
    if clip > 0 and ref:
        for r in accepted:
            if norms[r.site] > clip * ref:
                assert r.message is not None
                scale = clip * ref / norms[r.site]
                r.message.content[P.ARRAYS] = _scaled(r.message.content[P.ARRAYS], reference, scale)
                r.metrics[CLIPPED] = round(scale, 6)  # (the round's record only: the strategy averages the message)
                log.info("clipped the update of %s to %g x %s (x%.3f)", r.site, clip, how, scale)
    if min_cosine > -1 and len(accepted) >= MIN_SITES_FOR_NORM:
        consensus = np.median(np.stack([updates[r.site] for r in accepted]), axis=0)
        for r in accepted:
            cosine = _cosine(updates[r.site], consensus)
            if cosine < min_cosine:
                _reject(
                    r,
                    f"update points away from the others' (cosine {cosine:.2f} with their coordinate-wise median, "
                    f"below federation.update_min_cosine={min_cosine:g})",
                )


def _cap_weight(reply: SiteReply, cap: float | None) -> None:
    """Lower a reply's ``num-examples`` to ``cap`` (None: no cap), in the message the strategy averages."""
    weight = reply.metrics.get(P.NUM_EXAMPLES)
    if cap is None or reply.message is None or not isinstance(weight, (int, float)) or weight <= cap:
        return
    log.info("%s: weighted by %g, not its %g cases (federation.max_weight_ratio)", reply.site, cap, weight)
    reply.message.content[P.METRICS][P.NUM_EXAMPLES] = int(cap) if float(cap).is_integer() else float(cap)


def _scaled(arrays: ArrayRecord, reference: dict[str, np.ndarray], scale: float) -> ArrayRecord:
    """The weights ``reference + scale * (arrays - reference)`` (floating-point arrays; the others as sent)."""
    out = {}
    for key, array in arrays.items():
        value, ref = array.numpy(), reference[key]
        if ref.dtype.kind == "f":
            value = (ref.astype(np.float64) + scale * (value.astype(np.float64) - ref)).astype(value.dtype)
        out[key] = Array(np.array(value, order="C"))  # (ascontiguousarray would make a 0-d array 1-d)
    return ArrayRecord(array_dict=out)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else 1.0


def _reject(reply: SiteReply, why: str) -> None:
    log.warning("rejected the reply of %s: %s", reply.site, why)
    reply.status, reply.error = P.REJECTED, why


def nonfinite_key(arrays: ArrayRecord) -> str | None:
    """The first array of ``arrays`` holding a non-finite value (None when all are finite)."""
    for key, value in arrays.items():
        a = value.numpy()
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return key
    return None
