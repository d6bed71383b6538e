"""The MAE decoder: visible-patch latents back to pixel predictions for every patch."""

from __future__ import annotations

import torch
from torch import nn

from amlp_core.config import ModelConfig
from amlp_core.models.vit import sincos_position_embedding, transformer_stack


class LearnedToken(nn.Module):
    """One learned ``[D]`` vector, repeated wherever it is needed.

    A module of its own (rather than a bare parameter of the decoder) so that per-case
    gradients, which DP-SGD needs, are taken through its own forward.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        """``[B, M, D]`` (only its shape and dtype count) -> the token at each of the ``B * M`` places."""
        return like + self.weight.to(like.dtype)


class MAEDecoder(nn.Module):
    """Lightweight transformer decoder of masked autoencoding.

    Visible latents are projected to the decoder width, mask tokens are inserted at the
    masked positions, positions are added and a few blocks predict each patch's pixels.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.embed_dim, cfg.decoder_dim)
        self.mask_token = LearnedToken(cfg.decoder_dim)
        self.pos_embed = sincos_position_embedding(cfg.grid_size, cfg.decoder_dim)
        self.blocks = transformer_stack(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.decoder_dim)
        self.head = nn.Linear(cfg.decoder_dim, cfg.in_channels * cfg.patch_size ** cfg.spatial_dims)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch.

        Args:
            latent: ``[B, N_keep, D]`` encoder output on the visible patches, in ``ids_keep`` order.
            ids_restore: ``[B, N]`` position of each original patch in ``[kept..., masked...]``.

        Returns:
            ``[B, N, C * p**dims]`` pixel predictions in patch order.
        """
        b, n_keep, _ = latent.shape
        n = ids_restore.shape[1]
        x = self.proj(latent)  # [B, N_keep, Dd]
        mask_tokens = self.mask_token(x.new_zeros(b, n - n_keep, x.shape[-1]))  # [B, N_mask, Dd]
        x = torch.cat([x, mask_tokens], dim=1)  # [B, N, Dd] in [kept..., masked...] order
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, N, Dd] patch order
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # [B, N, C * p**dims]
