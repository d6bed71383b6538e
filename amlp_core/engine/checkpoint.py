"""Checkpoints that carry their own metadata and load with ``weights_only=True``.

A checkpoint is a dict ``{"format": 1, "meta": {...}, "state": {name: state_dict}}`` of
tensors and plain Python values only. Writing goes to a temporary file in the same
folder, is flushed to disk and then renamed over the old file, so a crash mid-write
never replaces a good checkpoint with a half-written one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from amlp_core.atomic import atomic_write, atomic_write_text
from amlp_core.errors import CheckpointError
from amlp_core.reading import regular_file

__all__ = ["FORMAT_VERSION", "atomic_write_text", "load_checkpoint", "require_meta", "save_checkpoint"]

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Atomically write ``state`` (named state dicts) and ``meta`` (plain values) to ``path``."""
    payload = {"format": FORMAT_VERSION, "meta": dict(meta), "state": dict(state)}
    return atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state, meta)``.

    Raises:
        CheckpointError: missing, unreadable or not one of ours; the message names the file.
    """
    path = regular_file(path, "checkpoint", CheckpointError)  # never a FIFO or a device
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION or "state" not in payload:
        raise CheckpointError(f"checkpoint {path} is not a fedamlp checkpoint (format {FORMAT_VERSION})")
    return payload["state"], payload.get("meta", {})


def require_meta(meta: Mapping[str, Any], path: str | Path, **expected: Any) -> None:
    """Refuse a checkpoint whose metadata differs from what the caller needs."""
    for key, want in expected.items():
        have = meta.get(key)
        if have != want:
            raise CheckpointError(f"checkpoint {path} has {key}={have!r}, expected {want!r}")
