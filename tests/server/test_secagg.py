"""Secure aggregation: refused combinations, the site's refusal to send in the clear, the error bound.

The protocol itself runs in real simulations in tests/integration/test_secagg.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from amlp_core import protocol as P
from amlp_core.config import build_config, flat_dict
from amlp_core.errors import ConfigError
from client.app import app
from client.secagg import SECAGG_ERROR, expected_shares
from server.secagg import SecAggRound, _apply
from tests.client.helpers import message
from tests.conftest import tiny_config

SECURE = {"federation.secure_aggregation": True}


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_strategies_are_refused_with_secure_aggregation(strategy):
    with pytest.raises(ConfigError, match=rf"federation.strategy='{strategy}'.*federation.secure_aggregation=true"):
        build_config({**SECURE, "federation.strategy": strategy})
    build_config({"federation.strategy": strategy})  # fine without it


def test_server_side_dp_is_refused_with_secure_aggregation():
    with pytest.raises(ConfigError, match=r"privacy.server_dp=True with federation.secure_aggregation=True"):
        build_config({**SECURE, "privacy.server_dp": True})


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_strategies_that_work_on_the_sum_are_accepted(strategy):
    cfg = build_config({**SECURE, "federation.strategy": strategy, "privacy.site_dp": strategy != "fedprox"})
    assert cfg.federation.secure_aggregation


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("federation.min_sites", 1, "at least 2"),
        ("federation.secagg_reconstruction_threshold", 0.5, r"\(0.5, 1\]"),
        ("federation.secagg_num_shares", 0.0, r"\(0, 1\]"),
        ("federation.secagg_clipping_range", 0.0, "positive"),
        ("federation.secagg_max_weight", -1.0, "positive"),
    ],
)
def test_secagg_settings_are_checked(key, value, why):
    with pytest.raises(ConfigError, match=rf"{key}.*{why}"):
        build_config({**SECURE, key: value})


def test_the_quantized_sum_must_stay_below_the_modulus():
    build_config({**SECURE, "federation.sites": 63})  # 63 * 2**26 < 2**32
    build_config({"federation.sites": 64})  # only with secure aggregation
    with pytest.raises(ConfigError, match="federation.secagg_quantization_range.*2\\*\\*32"):
        build_config({**SECURE, "federation.sites": 64})


def _train_message(node_id: int) -> Message:
    content = {
        P.ARRAYS: ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
        P.CONFIG: ConfigRecord({P.PHASE: P.PRETRAIN}),
    }
    return message(RecordDict(content), node_id, "train")


def test_a_site_of_a_secure_run_refuses_to_send_its_update_in_the_clear(tmp_path):
    cfg = tiny_config(2, **{**SECURE, "federation.run_dir": str(tmp_path)})
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=flat_dict(cfg),
    )
    reply = app(_train_message(7), context)
    assert reply.has_error() and reply.error.code == SECAGG_ERROR
    assert "secure aggregation" in reply.error.reason and "in the clear" in reply.error.reason


def test_error_bound_and_update_application():
    fed = build_config({**SECURE, "federation.secagg_max_weight": 10.0}).federation
    step = 2 * fed.secagg_clipping_range / fed.secagg_quantization_range
    assert SecAggRound(fed).error_bound([8, 8, 8]) == pytest.approx(3 * step / 2.4)
    arrays = ArrayRecord({"f": Array(np.ones(2, np.float32)), "n": Array(np.array([5], np.int64))})
    out = _apply(arrays, [np.array([0.5, -0.25]), np.array([2.6])])
    assert out["f"].numpy().dtype == np.float32 and out["f"].numpy().tolist() == [1.5, 0.75]
    assert out["n"].numpy().dtype == np.int64 and out["n"].numpy().tolist() == [8]


def _setup_message(node_id: int, **changes) -> Message:
    """Flower's SecAgg+ setup message, as SecAggPlusWorkflow builds it for 3 sites with our defaults."""
    fed = build_config(SECURE).federation
    shares, threshold = expected_shares(fed, 3)
    record = {
        Key.STAGE: Stage.SETUP,
        Key.SAMPLE_NUMBER: 3,
        Key.SHARE_NUMBER: shares,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: fed.secagg_clipping_range,
        Key.TARGET_RANGE: fed.secagg_quantization_range,
        Key.MOD_RANGE: 2**32,
        Key.MAX_WEIGHT: fed.secagg_max_weight,
        **changes,
    }
    return message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(record)}), node_id, "train", group_id="1")


def test_a_site_answers_the_setup_and_refuses_a_weakened_one(tmp_path):
    cfg = tiny_config(2, **{**SECURE, "federation.run_dir": str(tmp_path)})
    assert expected_shares(cfg.federation, 3) == (3, 2) and expected_shares(cfg.federation, 5) == (5, 3)

    def context():
        return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=flat_dict(cfg))

    reply = app(_setup_message(7), context())  # Flower's secaggplus_mod answers with the site's public keys
    assert not reply.has_error() and {"pk1", "pk2"} <= set(reply.content[RECORD_KEY_CONFIGS])
    for change in ({Key.THRESHOLD: 1}, {Key.SHARE_NUMBER: 5}, {Key.CLIPPING_RANGE: 8.0}):
        reply = app(_setup_message(7, **change), context())
        assert reply.has_error() and reply.error.code == SECAGG_ERROR and "differs from the run's" in reply.error.reason
