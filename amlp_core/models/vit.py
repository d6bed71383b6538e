"""The one ViT encoder, for 2D and 3D images, shared by the MAE and segmentation heads.

Shapes: ``B`` batch, ``C`` channels, ``N`` patches, ``D`` embedding size,
``*S`` the spatial size (H, W) or (H, W, D), ``*G`` the patch grid (S / patch_size).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import nn

from amlp_core.config import ModelConfig


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


class ViTEncoder(nn.Module):
    """Patch embedding + fixed position embedding + transformer blocks.

    The forward is split into named stages so that the pretext methods can reuse the
    patch embedding (MPS features, CCL) without a second pass:

    - :meth:`embed`: image ``[B, C, *S]`` -> patch tokens ``[B, N, D]`` (no position)
    - :meth:`encode`: patch tokens, optional kept indices ``[B, N_keep]`` -> ``[B, N_keep, D]``
    - :meth:`forward`: both, on the whole image or on the kept patches only.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        conv = nn.Conv3d if cfg.spatial_dims == 3 else nn.Conv2d
        self.patch_embed = conv(cfg.in_channels, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = sincos_position_embedding(cfg.grid_size, cfg.embed_dim)
        self.blocks = transformer_stack(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.embed_dim)

    @property
    def grid_size(self) -> tuple[int, ...]:
        return self.cfg.grid_size

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, *S]`` -> patch tokens ``[B, N, D]`` (before the position embedding)."""
        expected = (self.cfg.in_channels, *self.cfg.img_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"encoder expects images of shape [B, {', '.join(map(str, expected))}], "
                             f"got {list(images.shape)}")
        return self.patch_embed(images).flatten(2).transpose(1, 2)

    def encode(self, tokens: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Add positions, keep the visible patches, run the transformer.

        Args:
            tokens: ``[B, N, D]`` from :meth:`embed`.
            ids_keep: ``[B, N_keep]`` indices of the visible patches, or None for all.

        Returns:
            ``[B, N_keep, D]`` (``N_keep = N`` when ``ids_keep`` is None), layer-normalised.
        """
        x = tokens + self.pos_embed.to(tokens.dtype)  # [B, N, D]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, N_keep, D]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C, *S]`` -> ``[B, N_keep, D]``."""
        return self.encode(self.embed(images), ids_keep)


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
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
