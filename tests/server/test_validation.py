"""The server's checks on the sites' replies (server/validation.py), on real Flower messages.

Each hostile reply below passed straight into the strategy before the checks existed: one NaN
made every strategy's average NaN, an inflated ``num-examples`` replaced the global model, a
(1,)-shaped tensor was broadcast, and a wrong shape or a negative count crashed the ServerApp.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from amlp_core import protocol as P
from amlp_core.config import FederationConfig
from amlp_core.errors import ConfigError
from server.rounds import FederationError, check_finite, check_outcome, collect
from server.strategies import build_strategy
from server.validation import Declarations, NormHistory, check_replies
from tests.server.helpers import reply, request

GLOBAL = {"w": torch.zeros(4, 3), "b": torch.zeros(3), "steps": torch.zeros((), dtype=torch.int64)}
SITES = ("a", "b", "c", "d")


def _declared(n: int = 10) -> Declarations:
    declared = Declarations(timeout=1.0)
    for node in range(1, len(SITES) + 1):
        declared.counts[node] = {P.DECLARED_TRAIN: n, P.DECLARED_LABELLED: n, P.DECLARED_TEST: n}
    return declared


def _honest(node: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(node)
    return {"w": 0.1 * torch.randn(4, 3) + 1.0, "b": 0.1 * torch.randn(3), "steps": torch.tensor(5)}


def _round(poisoned: dict[str, torch.Tensor] | None = None, n: float = 10, factor: float = 10.0, cosine: float = 0.0):
    """Four sites answer; site d sends ``poisoned`` (or honest weights) with ``n`` examples."""
    sent = [request(node) for node in range(1, 5)]
    replies = [reply(node, _honest(node), {P.NUM_EXAMPLES: 10}, site) for node, site in zip((1, 2, 3), SITES)]
    replies.append(reply(4, poisoned if poisoned is not None else _honest(4), {P.NUM_EXAMPLES: n}, "d"))
    outcome = collect(sent, replies, time.monotonic())
    check_replies(outcome.replies, ArrayRecord(GLOBAL), P.PRETRAIN, _declared(), factor, cosine)
    return outcome


def _status(outcome) -> dict[str, tuple[str, str]]:
    return {r.site: (r.status, r.error) for r in outcome.replies}


def test_honest_replies_are_all_accepted():
    assert all(status == P.OK for status, _ in _status(_round()).values())


def _with(**changes) -> dict[str, torch.Tensor]:
    return {**_honest(4), **changes}


@pytest.mark.parametrize(
    "poisoned, n, reason",
    [
        (_with(w=torch.full((4, 3), float("nan"))), 10, "w holds non-finite values"),
        (_with(b=torch.tensor([1.0, float("inf"), 0.0])), 10, "b holds non-finite values"),
        (_with(w=torch.ones(1)), 10, "w is float32[1], the global model's float32[4, 3]"),
        (_with(w=torch.ones(4, 3, dtype=torch.float64)), 10, "w is float64[4, 3]"),
        ({"w": torch.ones(4, 3), "b": torch.ones(3)}, 10, "missing ['steps']"),
        ({**_with(), "extra": torch.ones(2)}, 10, "unexpected ['extra']"),
        (None, 1e9, "num-examples=1e+09 exceeds the 10 cases the site declared"),
        (None, -5, "num-examples=-5 is not a positive whole number"),
        (None, 0, "num-examples=0 is not a positive whole number"),
        (None, 2.5, "num-examples=2.5 is not a positive whole number"),
        (None, float("nan"), "num-examples=nan is not a number"),
        (_with(w=100 * _honest(4)["w"]), 10, "update norm"),
        ({k: -v if v.is_floating_point() else v for k, v in _honest(4).items()}, 10, "points away from the others'"),
    ],
)
def test_a_hostile_reply_is_rejected_naming_why(poisoned, n, reason):
    status = _status(_round(poisoned, n))
    assert status["d"][0] == P.REJECTED and reason in status["d"][1]
    assert all(status[s][0] == P.OK for s in "abc")


def test_the_norm_and_direction_checks_can_be_turned_off_and_need_three_sites():
    assert _status(_round(_with(w=100 * _honest(4)["w"]), factor=0.0))["d"][0] == P.OK
    assert _status(_round(_with(w=-_honest(4)["w"]), cosine=-1.0))["d"][0] == P.OK
    sent = [request(1), request(2)]
    replies = [
        reply(1, _honest(1), {P.NUM_EXAMPLES: 10}, "a"),
        reply(2, _with(w=100 * _honest(2)["w"]), {P.NUM_EXAMPLES: 10}, "b"),
    ]
    outcome = collect(sent, replies, time.monotonic())
    history = NormHistory()
    check_replies(outcome.replies, ArrayRecord(GLOBAL), P.PRETRAIN, _declared(), 10.0, clip=3.0, history=history)
    assert all(r.status == P.OK for r in outcome.replies)  # two cannot judge each other: honest sites of other
    assert history.warned  # sizes were measured 100x apart; the server says loudly that it has no defence here


def _norm(arrays: ArrayRecord) -> float:
    return float(np.sqrt(sum(((arrays[k].numpy() - GLOBAL[k].numpy()) ** 2).sum() for k in ("w", "b"))))


def test_an_accepted_update_longer_than_the_clip_factor_is_scaled_down():
    """Three honest sites and one x5 (under the rejection factor of 10): the long one is clipped to 3x the
    round's median before FedAvg sees it; integers travel as sent."""
    scaled = {k: 5 * v if v.is_floating_point() else v for k, v in _honest(4).items()}
    sent = [request(node) for node in range(1, 5)]
    replies = [reply(node, _honest(node), {P.NUM_EXAMPLES: 10}, site) for node, site in zip((1, 2, 3), SITES)]
    replies.append(reply(4, scaled, {P.NUM_EXAMPLES: 10}, "d"))
    outcome = collect(sent, replies, time.monotonic())
    before = {r.site: _norm(r.message.content[P.ARRAYS]) for r in outcome.replies}
    check_replies(outcome.replies, ArrayRecord(GLOBAL), P.FINETUNE, _declared(), 10.0, clip=3.0)
    after = {r.site: _norm(r.message.content[P.ARRAYS]) for r in outcome.replies}
    median = float(np.median(list(before.values())))
    assert all(r.status == P.OK for r in outcome.replies)
    assert after["d"] == pytest.approx(3 * median, rel=1e-5) and after["a"] == pytest.approx(before["a"])
    assert outcome.replies[3].metrics["update_clipped"] == pytest.approx(3 * median / before["d"], rel=1e-4)
    d = outcome.replies[3].message.content[P.ARRAYS]
    assert torch.equal(torch.from_numpy(d["steps"].numpy()), scaled["steps"])


def test_a_sites_weight_is_capped_by_the_others_declarations():
    declared = _declared()
    declared.counts[4] = {P.DECLARED_TRAIN: 10**6, P.DECLARED_LABELLED: 10**6, P.DECLARED_TEST: 10}  # it says so
    sent = [request(node) for node in range(1, 5)]
    replies = [reply(node, _honest(node), {P.NUM_EXAMPLES: 10}, site) for node, site in zip((1, 2, 3), SITES)]
    replies.append(reply(4, _honest(4), {P.NUM_EXAMPLES: 10**6}, "d"))
    outcome = collect(sent, replies, time.monotonic())
    check_replies(outcome.replies, ArrayRecord(GLOBAL), P.PRETRAIN, declared, 10.0, weight_ratio=4.0)
    weights = {r.site: r.message.content[P.METRICS][P.NUM_EXAMPLES] for r in outcome.replies}
    assert weights == {"a": 10, "b": 10, "c": 10, "d": 40}  # 4 x the others' median, not its million
    strategy = build_strategy(FederationConfig(), evaluate=False)
    arrays, _ = strategy.aggregate_train(1, [r.message for r in outcome.ok])
    expected = (10 * (_honest(1)["w"] + _honest(2)["w"] + _honest(3)["w"]) + 40 * _honest(4)["w"]) / 70
    assert np.allclose(arrays["w"].numpy(), expected.numpy(), atol=1e-6)  # FedAvg used the capped weight


def test_an_injection_must_name_a_simulated_site():
    with pytest.raises(ConfigError, match="names 'site7', none of the simulation's 4 sites"):
        FederationConfig(sites=4, inject="site7:poison")
    FederationConfig(sites=4, inject="site3:poison")


def test_a_site_that_declared_nothing_is_rejected():
    sent = [request(9)]
    outcome = collect(sent, [reply(9, _honest(1), {P.NUM_EXAMPLES: 10}, "x")], time.monotonic())
    declared = _declared()
    declared.problems[9] = "did not declare its data at the start of the run (no reply)"
    check_replies(outcome.replies, ArrayRecord(GLOBAL), P.PRETRAIN, declared, 10.0)
    assert outcome.replies[0].status == P.REJECTED and "did not declare" in outcome.replies[0].error


def test_each_kind_of_round_is_bounded_by_its_own_declaration():
    declared = _declared()
    declared.counts[1] = {P.DECLARED_TRAIN: 40, P.DECLARED_LABELLED: 4, P.DECLARED_TEST: 6}
    outcomes = {}
    for kind, n in ((P.PRETRAIN, 40), (P.FINETUNE, 5), ("evaluate", 6)):
        outcome = collect([request(1)], [reply(1, _honest(1), {P.NUM_EXAMPLES: n}, "a")], time.monotonic())
        check_replies(outcome.replies, None if kind == "evaluate" else ArrayRecord(GLOBAL), kind, declared, 0.0)
        outcomes[kind] = outcome.replies[0]
    assert outcomes[P.PRETRAIN].status == P.OK and outcomes["evaluate"].status == P.OK
    assert outcomes[P.FINETUNE].status == P.REJECTED and "4 cases" in outcomes[P.FINETUNE].error


@pytest.mark.parametrize("dice", [1.5, -0.1, float("inf")])
def test_an_impossible_dice_is_rejected(dice):
    outcome = collect(
        [request(1)], [reply(1, {}, {P.NUM_EXAMPLES: 3, "dice_1": dice, "dice_mean": 0.5}, "a")], time.monotonic()
    )
    check_replies(outcome.replies, None, "evaluate", _declared(), 0.0)
    assert outcome.replies[0].status == P.REJECTED and "dice_1" in outcome.replies[0].error


def test_a_nan_dice_of_an_absent_class_is_accepted():
    outcome = collect(
        [request(1)], [reply(1, {}, {P.NUM_EXAMPLES: 3, "dice_1": math.nan, "dice_mean": 0.5}, "a")], time.monotonic()
    )
    check_replies(outcome.replies, None, "evaluate", _declared(), 0.0)
    assert outcome.replies[0].status == P.OK


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"])
def test_after_the_checks_every_strategy_averages_the_honest_sites_only(strategy):
    outcome = _round(_with(w=torch.full((4, 3), float("nan"))), n=1e9)
    check_outcome(outcome, "pretrain round 1", 4, min_sites=2)
    s = build_strategy(FederationConfig(strategy=strategy, trim_beta=0.25), evaluate=False)
    if strategy == "fedadam":
        s.current_arrays = {k: v.numpy() for k, v in GLOBAL.items()}
    arrays, _ = s.aggregate_train(1, [r.message for r in outcome.ok])
    check_finite(arrays, "pretrain round 1")
    honest = np.mean([_honest(n)["w"].numpy() for n in (1, 2, 3)], axis=0)
    if strategy in ("fedavg", "fedprox"):
        assert np.allclose(arrays["w"].numpy(), honest, atol=1e-6)
    assert len(outcome.ok) == 3


def test_too_few_acceptable_replies_fail_the_round_naming_each_problem():
    outcome = _round(_with(w=torch.ones(1)))
    with pytest.raises(FederationError, match=r"only 3 of 4 sites .*d: rejected - w is float32\[1\]"):
        check_outcome(outcome, "pretrain round 1", 4, min_sites=4)


def test_a_non_finite_aggregate_is_refused():
    with pytest.raises(FederationError, match="aggregate's w is not finite; it is neither saved nor sent"):
        check_finite(ArrayRecord({"w": torch.tensor([1.0, float("nan")])}), "finetune round 2")


@pytest.mark.parametrize("value", [1.0, 0.5, -1.0, float("nan")])
def test_the_norm_factor_is_checked(value):
    with pytest.raises(ConfigError, match="federation.update_norm_factor"):
        FederationConfig(update_norm_factor=value)


@pytest.mark.parametrize("value", [1.0, -1.5, float("nan")])
def test_the_minimum_cosine_is_checked(value):
    with pytest.raises(ConfigError, match="federation.update_min_cosine"):
        FederationConfig(update_min_cosine=value)


def test_the_plan_is_decided_from_the_fingerprints_and_a_site_that_does_not_fit_is_refused():
    from amlp_core.config import PlanConfig
    from amlp_core.data.plan import Fingerprint

    def fp(cases, modality, spacing):
        geometry = dict.fromkeys(("spacing_median", "spacing_min", "spacing_max"), spacing)
        sizes = dict.fromkeys(("size_median", "size_min", "size_max"), (40.0, 50.0, 40.0))
        return Fingerprint(cases=cases, labelled=cases, modality=modality, **geometry, **sizes)

    declared = Declarations(timeout=1.0)
    declared.names = {1: "a", 2: "b", 3: "c", 4: "d"}
    declared.fingerprints = {
        1: fp(20, "MR", (1.0, 1.0, 1.0)),
        2: fp(10, "MR", (1.0, 1.0, 1.2)),
        3: fp(5, "CT", (1.0, 1.0, 1.0)),  # another modality
        4: fp(5, "MR", (1.0, 1.0, 5.0)),  # far coarser slices
    }
    plan = declared.decide(PlanConfig(), (48, 64, 48), 8)
    assert plan.modality == "MR" and plan.target_spacing == (1.0, 1.0, 1.0) and plan.normalization == "zscore"
    assert plan.input_size == (48, 64, 48)  # the median case (40 x 50 x 40 voxels at 1 mm) fits in model.img_size
    assert sorted(declared.refused) == [3, 4]
    assert "CT" in declared.refused[3] and "axis 2" in declared.refused[4]
    # A plan given in the run config (or kept by a resumed run) is used as it is.
    fixed = PlanConfig(target_spacing=(1.0, 1.0, 5.0), modality="MR", normalization="zscore", input_size=(48, 64, 48))
    again = Declarations(timeout=1.0, fingerprints=dict(declared.fingerprints))
    assert again.decide(fixed, (32, 32, 32), 8) == fixed and sorted(again.refused) == [1, 2, 3]
    # A plan that leaves the input size open (a resumed run's from before it was planned) gets it decided.
    assert again.decide(dataclasses.replace(fixed, input_size=()), (48, 64, 48), 8) == fixed


def test_a_crashed_worker_is_named_by_its_site_in_one_line():
    """A site whose worker died answers with Flower's traceback and no site name: the record names the site from
    its declaration and keeps the exception's line."""
    from flwr.app import Error, Message

    trace = "Traceback (most recent call last):\n" + '  File "x.py", line 1\n' * 40
    trace += "ray.exceptions.RayActorError: The actor died unexpectedly before finishing this task."
    crashed = Message(error=Error(code=0, reason=trace), reply_to=request(2))
    outcome = collect([request(2)], [crashed], time.monotonic(), {2: "site1"})
    (only,) = outcome.replies
    assert only.site == "site1" and only.status == P.ERROR
    assert only.error == "ray.exceptions.RayActorError: The actor died unexpectedly before finishing this task."
