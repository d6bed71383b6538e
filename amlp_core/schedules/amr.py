"""AMR, the adjustable masking ratio: a pure function of training progress.

``r(t) = r0 + (r1 - r0) * s(t)`` with ``t`` in [0, 1] and ``s`` linear or cosine. In a
federation every site computes ``t`` from the server's round counter, so all sites mask
alike in the same round.
"""

from __future__ import annotations

import math


def amr_ratio(progress: float, start: float = 0.25, end: float = 0.75, schedule: str = "linear") -> float:
    """Masking ratio at training progress ``progress`` in [0, 1] (clamped).

    Raises:
        ValueError: for an unknown schedule.
    """
    t = min(max(float(progress), 0.0), 1.0)
    if schedule == "linear":
        s = t
    elif schedule == "cosine":
        s = 0.5 * (1.0 - math.cos(math.pi * t))
    else:
        raise ValueError(f"unknown AMR schedule {schedule!r}: expected linear or cosine")
    return start + (end - start) * s


def federated_progress(server_round: int, local_epoch: int, local_epochs: int, total_rounds: int) -> float:
    """Progress ``t = (round - 1 + local_epoch / local_epochs) / total_rounds`` of a federated run.

    Args:
        server_round: the global pretraining round, starting at 1.
        local_epoch: epochs already done in this round, in [0, local_epochs).
        local_epochs: local epochs per round.
        total_rounds: pretraining rounds of the whole run.
    """
    if server_round < 1 or server_round > total_rounds:
        raise ValueError(f"server round {server_round} is outside 1..{total_rounds}")
    if not 0 <= local_epoch <= local_epochs or local_epochs < 1:
        raise ValueError(f"local epoch {local_epoch} is outside 0..{local_epochs}")
    return (server_round - 1 + local_epoch / local_epochs) / total_rounds
