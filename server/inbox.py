"""An audit log of everything the server sends and receives (an opt-in hook for audits and tests).

With the environment variable ``FEDAMLP_SERVER_INBOX`` set to a folder, the ServerApp's grid
is wrapped so that every ``send_and_receive`` call is written there as one pickle
(``0001.pkl``, ...): the messages sent and every reply received, each with its node, type,
error and every record's content (arrays as NumPy arrays). It is how the tests show that,
with secure aggregation, no reply the server receives holds a site's update. Nothing is
written when the variable is unset.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

ENV = "FEDAMLP_SERVER_INBOX"


def snapshot(message: Message) -> dict[str, Any]:
    """A plain-data copy of a message: node ids, type, error, and every record."""
    out: dict[str, Any] = {
        "src": message.metadata.src_node_id,
        "dst": message.metadata.dst_node_id,
        "type": message.metadata.message_type,
        "error": None,
        "arrays": {},
        "configs": {},
        "metrics": {},
    }
    if message.has_error():
        out["error"] = message.error.reason
        return out
    content = message.content
    out["arrays"] = {
        name: {k: a.numpy() for k, a in record.items() if a.data} for name, record in content.array_records.items()
    }
    out["configs"] = {name: dict(record) for name, record in content.config_records.items()}
    out["metrics"] = {name: dict(record) for name, record in content.metric_records.items()}
    return out


class InboxGrid:
    """Delegates to ``grid``; writes each exchange to ``folder``."""

    def __init__(self, grid: Grid, folder: str | Path) -> None:
        self._grid = grid
        self._folder = Path(folder)
        self._folder.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        sent = [snapshot(m) for m in messages]
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._count += 1
        path = self._folder / f"{self._count:04d}.pkl"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps({"sent": sent, "received": [snapshot(r) for r in replies]}))
        tmp.replace(path)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def maybe_record(grid: Grid) -> Grid:
    """``grid`` wrapped in an :class:`InboxGrid` when ``FEDAMLP_SERVER_INBOX`` is set."""
    folder = os.environ.get(ENV)
    return InboxGrid(grid, folder) if folder else grid  # type: ignore[return-value]
