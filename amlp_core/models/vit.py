"""Transformer pieces (blocks, fixed position embedding) and the patch <-> image reshapes.

The encoder's ViT (:class:`~amlp_core.models.encoder.HybridEncoder`) and the MAE decoder are
built from these. Shapes: ``B`` batch, ``C`` channels, ``N`` patches, ``D`` embedding size,
``*S`` the spatial size (H, W) or (H, W, D), ``*G`` the patch grid (S / patch_size).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import nn


def sincos_position_embedding(grid_size: tuple[int, ...], dim: int) -> nn.Parameter:
    """Fixed sin-cos position embedding ``[1, N, dim]`` (not trained)."""
    with warnings.catch_warnings():  # MONAI calls torch.meshgrid without indexing=; its default is what it wants
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        pos = build_sincos_position_embedding(list(grid_size), dim, spatial_dims=len(grid_size))
    pos.requires_grad_(False)
    return pos


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))``.

    Built from Linear and LayerNorm only (every parameter used, per-sample gradients
    available to Opacus); attention by ``scaled_dot_product_attention``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``."""
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, N, D/H]
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


def transformer_stack(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, *S]`` -> ``[B, N, C * p**dims]``, patches in the encoder's token order."""
    b, c, *spatial = images.shape
    p = patch_size
    grid = [s // p for s in spatial]
    if len(spatial) == 2:
        x = images.reshape(b, c, grid[0], p, grid[1], p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, C]
    else:
        x = images.reshape(b, c, grid[0], p, grid[1], p, grid[2], p)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, gh, gw, gd, p, p, p, C]
    n = 1
    for g in grid:
        n *= g
    return x.reshape(b, n, -1)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, ...], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, C * p**dims]`` -> ``[B, C, *S]``."""
    b = patches.shape[0]
    p = patch_size
    dims = len(grid_size)
    x = patches.reshape(b, *grid_size, *([p] * dims), channels)
    if dims == 2:
        x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, gh, p, gw, p]
    else:
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, gh, p, gw, p, gd, p]
    return x.reshape(b, channels, *(g * p for g in grid_size))


def tokens_to_grid(tokens: torch.Tensor, grid_size: tuple[int, ...]) -> torch.Tensor:
    """``[B, N, D]`` -> feature map ``[B, D, *G]``."""
    b, _, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, *grid_size)


def encoder_state(state: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """The encoder's own weights out of a model's state dict (keys under ``prefix``, prefix removed)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
