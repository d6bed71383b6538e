"""FedProx's proximal term, which keeps local training near the round's global weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def proximal_term(model: nn.Module, mu: float) -> Callable[[], torch.Tensor]:
    """``mu / 2 * sum ||w - w_global||^2`` over ``model``'s parameters, ``w_global`` taken now."""
    anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def term() -> torch.Tensor:
        squares: torch.Tensor = sum((p - a).pow(2).sum() for p, a in anchors)  # type: ignore[assignment]
        return 0.5 * mu * squares

    return term
