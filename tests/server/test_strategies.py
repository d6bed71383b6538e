"""Aggregation strategies on real reply messages, and their state in a checkpoint."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Error, Message

from amlp_core import protocol as P
from amlp_core.config import FederationConfig
from server.rounds import collect
from server.strategies import build_strategy, restore_strategy_state, strategy_state
from tests.server.helpers import filled_reply, request

REPLIES = [(1, 1.0, 10, "a"), (2, 2.0, 10, "b"), (3, 10.0, 20, "c")]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fedavg", (10 * 1 + 10 * 2 + 20 * 10) / 40),  # weighted by number of samples
        ("fedprox", (10 * 1 + 10 * 2 + 20 * 10) / 40),
        ("fedmedian", 2.0),  # robust to the outlier site
        ("fedtrimmedavg", 2.0),
    ],
)
def test_aggregation(name, expected):
    strategy = build_strategy(FederationConfig(strategy=name, trim_beta=0.34), evaluate=True)
    arrays, metrics = strategy.aggregate_train(1, [filled_reply(*r) for r in REPLIES])
    assert arrays["w"].numpy() == pytest.approx(np.full(2, expected))
    assert metrics[P.LOSS] == pytest.approx((10 * 1 + 10 * 2 + 20 * 10) / 40)


def test_fedadam_state_survives_a_checkpoint():
    strategy = build_strategy(FederationConfig(strategy="fedadam", server_lr=0.1), evaluate=False)
    strategy.current_arrays = {"w": np.zeros(2, dtype=np.float32)}
    strategy.aggregate_train(1, [filled_reply(*r) for r in REPLIES])
    state = strategy_state(strategy)
    assert set(state) == {"m_t", "v_t"} and state["m_t"]["w"].abs().sum() > 0
    fresh = build_strategy(FederationConfig(strategy="fedadam", server_lr=0.1), evaluate=False)
    restore_strategy_state(fresh, state)
    assert np.array_equal(fresh.m_t["w"], strategy.m_t["w"]) and np.array_equal(fresh.v_t["w"], strategy.v_t["w"])


def test_collect_sorts_replies_into_ok_error_and_missing():
    sent = [request(node) for node in (1, 2, 3)]
    failed = Message(error=Error(code=1, reason="site b: /data/x.nii.gz: file is truncated"), reply_to=sent[1])
    outcome = collect(sent, [filled_reply(1, 1.0, 5, "a"), failed], time.monotonic())
    by_status = {r.status: r for r in outcome.replies}
    assert by_status["ok"].site == "a" and by_status["error"].site == "b"
    assert "truncated" in by_status["error"].error and by_status["missing"].site == "node 3"
    assert "b: error" in outcome.problems() and "node 3: missing" in outcome.problems()
