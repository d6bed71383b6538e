"""The heads of ACE's student and teacher (docs/methods.md): projection, composition, decomposition.

All are plain ``Linear`` layers (per-case gradients available to Opacus). Shapes: ``D`` the
encoder's width, ``E`` the projection's bottleneck, ``K`` the prototypes, ``c = 2**dims`` the
small-crop tokens that one large-crop token covers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """DINO-style head: an MLP to a unit-norm bottleneck, then a linear layer to prototype logits.

    :meth:`project` gives the bottleneck ``[..., E]`` that the local (token) losses compare by
    cosine similarity; :meth:`forward` gives the prototype logits ``[..., K]`` of the global loss.
    """

    def __init__(self, dim: int, out_dim: int, bottleneck: int = 64, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Linear(bottleneck, out_dim, bias=False)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> unit-norm ``[..., E]``."""
        return F.normalize(self.mlp(x).float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> prototype logits ``[..., K]`` (float32)."""
        return self.prototypes(self.project(x)).float()


class Compose(nn.Module):
    """Merge the ``c`` tokens of a 2x2 (2x2x2) block into one: ``[B, M, c, D]`` -> ``[B, M, D]``."""

    def __init__(self, dim: int, children: int) -> None:
        super().__init__()
        self.merge = nn.Linear(children * dim, dim)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        return self.merge(blocks.flatten(2))  # [B, M, c * D] -> [B, M, D]


class Decompose(nn.Module):
    """Expand one token into the ``c`` tokens of a 2x2 (2x2x2) block: ``[B, M, D]`` -> ``[B, M, c, D]``."""

    def __init__(self, dim: int, children: int) -> None:
        super().__init__()
        self.parts = children
        self.expand = nn.Linear(dim, children * dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, m, d = tokens.shape
        return self.expand(tokens).view(b, m, self.parts, d)  # [B, M, c, D]
