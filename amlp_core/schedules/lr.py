"""Learning-rate schedule: linear warm-up, then cosine decay."""

from __future__ import annotations

import math


def warmup_cosine(progress: float, warmup: float = 0.05, floor: float = 0.01) -> float:
    """LR multiplier at ``progress`` in [0, 1]: linear warm-up over ``warmup``, cosine to ``floor``."""
    t = min(max(progress, 0.0), 1.0)
    if warmup > 0 and t < warmup:
        return max(t / warmup, 1e-3)
    span = max(1.0 - warmup, 1e-12)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / span))
