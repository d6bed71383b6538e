"""Real Flower messages as the server receives them: a site's training reply and the server's request."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from amlp_core import protocol as P


def _meta(src: int, dst: int, message_id: str, reply_to: str = "") -> Metadata:
    return Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )


def request(node: int) -> Message:
    """The server's (empty) training message to ``node``."""
    return Message(content=RecordDict(), metadata=_meta(0, node, f"m{node}"))


def reply(node: int, arrays: dict[str, torch.Tensor], metrics: dict, site: str) -> Message:
    """Site ``site`` (node ``node``) answers with ``arrays`` and ``metrics``."""
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord(arrays),
            P.METRICS: MetricRecord(metrics),
            P.SITE: ConfigRecord({P.SITE_NAME: site, P.CLASS_NAMES: "{}"}),
        }
    )
    return Message(content=content, metadata=_meta(node, 0, f"r{node}", reply_to=f"m{node}"))


def filled_reply(node: int, value: float, n: int, site: str) -> Message:
    """A reply whose one array ``w`` (2 values) is ``value``, weighted by ``n`` examples."""
    return reply(node, {"w": torch.full((2,), value)}, {P.NUM_EXAMPLES: n, P.LOSS: value}, site)
