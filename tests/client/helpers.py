"""Building blocks of the client tests: a tiny site config, a Flower context and the server's messages."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from amlp_core import protocol as P
from amlp_core.config import PlanConfig, flat_dict
from amlp_core.data.plan import plan_text
from tests.conftest import tiny_config


def cfg(tmp_path, **overrides):
    base = {
        "federation.run_dir": str(tmp_path / "run"),
        "federation.pretrain_rounds": 3,
        "data.synthetic_cases": 8,
        "federation.sites": 2,
    }
    return tiny_config(2, **{**base, **overrides})


def context(cfg, site: int, node_id: int | None = None, node_config=None) -> Context:
    return Context(
        run_id=1,
        node_id=node_id if node_id is not None else 100 + site,
        node_config=node_config or {"partition-id": site, "num-partitions": 2},
        state=RecordDict(),
        run_config=flat_dict(cfg),
    )


def phantom_plan(cfg) -> PlanConfig:
    """The plan a server decides for phantom sites: their 1 mm grid (they have no other), per-case z-score,
    and the model's input (phantoms are of its size)."""
    dims = len(cfg.data.synthetic_size)
    return PlanConfig(
        target_spacing=(1.0,) * dims, modality="MR", normalization="zscore", input_size=cfg.model.img_size
    )


def instructions(cfg, phase=P.PRETRAIN, rnd=1, **changes) -> ConfigRecord:
    fed = cfg.federation
    total = fed.pretrain_rounds if phase == P.PRETRAIN else fed.finetune_rounds
    record = {
        P.PHASE: phase,
        P.GLOBAL_ROUND: rnd,
        P.TOTAL_ROUNDS: total,
        P.LOCAL_EPOCHS: fed.local_epochs,
        P.CONFIG_DIGEST: P.config_digest(cfg),
        P.PLAN: plan_text(phantom_plan(cfg)),
    }
    if phase == P.PRETRAIN:
        from amlp_core.methods import mask_ratio_at
        from amlp_core.schedules import federated_progress

        record[P.EXPECTED_RATIO] = mask_ratio_at(cfg.method, federated_progress(rnd, 0, fed.local_epochs, total))
    else:
        record[P.LOCAL_STEPS] = fed.finetune_local_steps
        record[P.SEMI] = P.semi_settings(cfg)
    record.update(changes)
    return ConfigRecord(record)


def message(content: RecordDict, node_id: int, kind: str, group_id: str = "") -> Message:
    """A message as the SuperLink delivers it to a SuperNode (metadata filled in)."""
    meta = Metadata(
        run_id=1,
        message_id=f"m-{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=meta)


def train_message(cfg, arrays: dict, config: ConfigRecord, node_id: int) -> Message:
    return message(RecordDict({P.ARRAYS: ArrayRecord(arrays), P.CONFIG: config}), node_id, "train")
