"""Secure aggregation (SecAgg+) in real Flower simulations: the server sees only the sum.

Every message the server sends and receives is logged by the ServerApp's audit hook
(``FEDAMLP_SERVER_INBOX``, server/inbox.py). Each site's true update in a round is then
recomputed here, exactly as the site computed it (same global weights from the log, same
seeds, one thread like the simulation's actors), so the test knows what the server must
never see and what plain FedAvg of the same round gives.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.serverapp.strategy import FedAvg

from amlp_core import protocol as P
from amlp_core.config import Config, flat_dict
from amlp_core.data import partition_names, split_names, write_phantom_dataset
from client import tasks
from client.site import get_site
from server.inbox import ENV
from server.secagg import ERROR_BOUND, SecAggRound
from simulations.simulate import simulate
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow
SITES = 3


def _cfg(run_dir: Path, **overrides) -> Config:
    base = {
        "data.synthetic_cases": 10,
        "federation.sites": SITES,
        "federation.pretrain_rounds": 1,
        "federation.finetune_rounds": 1,
        "federation.run_dir": str(run_dir),
        "federation.connect_timeout": 60,
        "federation.round_timeout": 300,
        "train.device": "cpu",
        "train.warmup_epochs": 0,
        "federation.secure_aggregation": True,
        "federation.secagg_max_weight": 10.0,
    }
    return tiny_config(3, **{**base, **overrides})


def _simulate(cfg: Config, monkeypatch) -> tuple[Path, list[dict]]:
    run = Path(cfg.federation.run_dir)
    monkeypatch.setenv(ENV, str(run / "inbox"))
    simulate(cfg, timeout=600)
    exchanges = [pickle.loads(p.read_bytes()) for p in sorted((run / "inbox").glob("*.pkl"))]
    return run, exchanges


def _rows(run: Path) -> list[dict]:
    return json.loads((run / "results" / "rounds.json").read_text())["rows"]


def _stage(exchange: dict) -> str:
    """Which SecAgg+ stage an exchange was, from what the sites answered."""
    for reply in exchange["received"]:
        keys = set(reply["configs"].get("secaggplus_configs", {}))
        for stage, marker in (
            ("setup", "pk1"),
            ("share_keys", "ctxts"),
            ("collect", "masked_params"),
            ("unmask", "shares"),
        ):
            if marker in keys:
                return stage
    return exchange["sent"][0]["type"]


def _collect_exchanges(exchanges: list[dict]) -> list[dict]:
    return [e for e in exchanges if _stage(e) == "collect"]


def _global_weights(exchange: dict) -> tuple[dict[str, np.ndarray], dict]:
    """The global weights and instructions a SecAgg+ 'collect masked vectors' exchange sent (legacy FitIns)."""
    sent = exchange["sent"][0]
    config = dict(sent["configs"]["fitins.config"])
    keys = json.loads(config[P.ARRAY_KEYS])
    arrays = sent["arrays"]["fitins.parameters"]
    return {k: arrays[str(i)] for i, k in enumerate(keys)}, config


def _site_results(
    cfg: Config, sites: list[int], global_weights: dict[str, np.ndarray], config: dict, scratch: Path
) -> dict[int, tuple[dict[str, np.ndarray], float]]:
    """Each site's local weights and weight for the round, recomputed as the site computed them."""
    run_config = flat_dict(cfg.replace(federation={"run_dir": str(scratch)}))
    ins = tasks.Instructions.parse(config)
    work = tasks.pretrain_round if ins.phase == P.PRETRAIN else tasks.finetune_round
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the simulation's actors (one CPU each): the same float sums
    try:
        out = {}
        for s in sites:
            site = get_site(1, 1000 + s, run_config, {"partition-id": s, "num-partitions": SITES})
            state, metrics = work(site, {k: torch.from_numpy(v.copy()) for k, v in global_weights.items()}, ins)
            out[s] = ({k: v.numpy() for k, v in state.items()}, float(metrics[P.NUM_EXAMPLES]))
        return out
    finally:
        torch.set_num_threads(threads)


def _plain_fedavg(results: dict[int, tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """What Flower's FedAvg makes of the sites' true replies."""
    replies = [
        Message(
            content=RecordDict(
                {
                    P.ARRAYS: ArrayRecord({k: Array(v) for k, v in w.items()}),
                    P.METRICS: MetricRecord({P.NUM_EXAMPLES: n}),
                }
            ),
            metadata=Metadata(
                run_id=1,
                message_id=f"reply-{i}",
                src_node_id=i,
                dst_node_id=0,
                reply_to_message_id=f"m-{i}",
                group_id="",
                created_at=time.time(),
                ttl=3600.0,
                message_type=MessageType.TRAIN,
            ),
        )
        for i, (w, n) in results.items()
    ]
    arrays, _ = FedAvg().aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}


def _assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], bound: float) -> None:
    """Equal within SecAgg+'s quantization bound plus float32 rounding of the result."""
    eps = np.finfo(np.float32).eps
    for key, want in expected.items():
        excess = np.abs(got[key].astype(np.float64) - want) - (bound + 2 * eps * np.abs(want))
        assert excess.max() <= 0, f"{key}: off by {excess.max():.3g} beyond the bound {bound:.3g}"


def _aggregates(exchanges: list[dict]) -> list[dict[str, np.ndarray]]:
    """The server's aggregate of each training round: the next round's global weights, and the final
    model sent for evaluation."""
    collects = _collect_exchanges(exchanges)
    finetune_global, _ = _global_weights(collects[1])
    evaluation = next(e for e in exchanges if e["sent"][0]["type"] == MessageType.EVALUATE)
    return [finetune_global, evaluation["sent"][0]["arrays"][P.ARRAYS]]


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg")
    with pytest.MonkeyPatch.context() as mp:
        cfg = _cfg(root / "run")
        run, exchanges = _simulate(cfg, mp)
    rounds = []  # per training round: the global weights sent, and each site's true local weights
    for exchange in _collect_exchanges(exchanges):
        weights, config = _global_weights(exchange)
        rounds.append((weights, _site_results(cfg, list(range(SITES)), weights, config, root / "scratch")))
    return cfg, run, exchanges, rounds


def test_secure_aggregate_equals_plain_fedavg_of_the_same_round(secure_run):
    cfg, run, exchanges, rounds = secure_run
    rows = _rows(run)
    assert all(r["status"] == "ok" for r in rows) and {r["site"] for r in rows} == {
        "site0",
        "site1",
        "site2",
        P.ALL_SITES,
    }
    bound = SecAggRound(cfg.federation).error_bound([n for _, n in rounds[0][1].values()])
    assert 0 < bound < 1e-7
    train_all = [r for r in rows if r["kind"] == "train" and r["site"] == P.ALL_SITES]
    assert [r[ERROR_BOUND] for r in train_all] == pytest.approx([bound, bound])
    for phase, (global_weights, _) in zip(["pretrain", "finetune"], rounds, strict=True):
        # What each site sent: its masked vector, int64 (a weight factor, then every array).
        sent = {
            r["bytes_up"] for r in rows if r["phase"] == phase and r["kind"] == "train" and r["site"] != P.ALL_SITES
        }
        assert sent == {8 * (1 + sum(v.size for v in global_weights.values()))}
    for (global_weights, results), aggregate in zip(rounds, _aggregates(exchanges), strict=True):
        expected = _plain_fedavg(results)
        # After pretraining the aggregate travels as the encoder of the segmentation model.
        expected = {k: v for k, v in expected.items() if k in aggregate}
        assert any(k.startswith("encoder.") for k in expected)
        update = max(float(np.abs(expected[k] - global_weights[k]).max()) for k in expected)
        assert update > 1000 * bound  # the round did move the model, far beyond the tolerance
        _assert_close(aggregate, expected, bound)


def test_the_server_never_receives_a_sites_update(secure_run):
    _, _, exchanges, rounds = secure_run
    secret = []  # every array the server must not see: each site's local weights and update, per round
    for global_weights, results in rounds:
        for local, _ in results.values():
            for key, value in local.items():
                secret += [value, value - global_weights[key]]
    by_size: dict[int, list[np.ndarray]] = {}
    for s in secret:
        by_size.setdefault(s.size, []).append(s.ravel().astype(np.float64))

    training = [e for e in exchanges if e["sent"][0]["type"] == MessageType.TRAIN]
    assert [_stage(e) for e in training] == ["setup", "share_keys", "collect", "unmask"] * 2
    received, masked = [], 0
    for exchange in training:
        for reply in exchange["received"]:
            assert reply["error"] is None
            assert not any(reply["arrays"].values()), "a training reply carried arrays"
            for record in reply["configs"].values():
                for value in record.values():
                    for item in value if isinstance(value, list) else [value]:
                        if isinstance(item, bytes) and item[:6] == b"\x93NUMPY":
                            received.append(bytes_to_ndarray(item))
            masked += len(reply["configs"]["secaggplus_configs"].get("masked_params", []))
    assert masked == sum(SITES * (1 + len(g)) for g, _ in rounds)  # per site: a weight factor and each array
    compared = 0
    for array in received:
        flat = array.ravel().astype(np.float64)
        if flat.size >= 1000:  # a masked vector looks uniform over SecAgg+'s modulus 2**32
            assert flat.min() >= 0 and flat.max() < 2**32 and flat.std() > 2**32 / 4
        for s in by_size.get(flat.size, []):
            if not s.any():
                continue
            assert not np.allclose(flat, s, atol=1e-3 * np.abs(s).max()), "a received array equals a site's update"
            if flat.size >= 1000:  # (shorter vectors correlate by chance)
                assert abs(np.corrcoef(flat, s)[0, 1]) < 0.2, "a received array correlates with a site's update"
                compared += 1
    assert compared > 100  # the masked vectors were there and were compared


def test_a_site_that_fails_mid_protocol_is_unmasked_away(tmp_path, monkeypatch):
    """A site that fails while training (a truncated scan) drops out after the key exchange; the
    server removes its masks with the other sites' shares and aggregates the rest exactly."""
    data = write_phantom_dataset(tmp_path / "data", n=15, shape=(16, 16, 16), seed=0)
    cfg = _cfg(tmp_path / "run", **{"data.path": str(data), "federation.min_sites": 2})
    train, _ = split_names(
        [p.name.removesuffix(".nii.gz") for p in (data / "imagesTr").iterdir()],
        cfg.data.test_fraction,
        cfg.data.split_seed,
    )
    victim = data / "imagesTr" / f"{partition_names(train, SITES, 'iid', seed=cfg.data.split_seed)[1][0]}.nii.gz"
    victim.write_bytes(victim.read_bytes()[:100])
    run, exchanges = _simulate(cfg, monkeypatch)
    rows = _rows(run)
    errors = [r for r in rows if r["status"] != "ok"]
    assert errors and all(r["site"] == "site1" and r["error"].startswith("site site1: data problem") for r in errors)
    assert not [r for r in rows if victim.name.removesuffix(".nii.gz") in str(r)]  # no path or case id left the site
    assert [r["sites_ok"] for r in rows if r["site"] == P.ALL_SITES and r["kind"] == "train"] == [2, 2]
    collect = _collect_exchanges(exchanges)[-1]
    weights, config = _global_weights(collect)
    results = _site_results(cfg, [0, 2], weights, config, tmp_path / "scratch")
    bound = SecAggRound(cfg.federation).error_bound([n for _, n in results.values()])
    evaluation = next(e for e in exchanges if e["sent"][0]["type"] == MessageType.EVALUATE)
    _assert_close(evaluation["sent"][0]["arrays"][P.ARRAYS], _plain_fedavg(results), bound)
