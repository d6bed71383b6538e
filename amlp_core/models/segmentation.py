"""Segmentation network: the pretrained ViT encoder with a light convolutional decoder.

The encoder's tokens (1/p resolution) are upsampled step by step and joined with
shallow convolutional skip features computed from the image at 1, 1/2, 1/4, ...
resolution, as in UNETR but with few channels at full resolution, which is where
UNETR spends its time on a CPU.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UnetResBlock
from torch import nn

from amlp_core.config import ModelConfig
from amlp_core.models.vit import ViTEncoder, tokens_to_grid

NORM = ("instance", {"affine": True})  # no BatchNorm: Opacus's per-sample gradients need it


def _conv_transpose(dims: int, cin: int, cout: int, factor: int) -> nn.Module:
    conv = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
    return conv(cin, cout, kernel_size=factor, stride=factor)


class SegmentationNet(nn.Module):
    """ViT encoder + convolutional decoder with image skip features (a U-Net whose bottleneck is the ViT).

    Skip features are computed at 1/2, 1/4, ... 1/2**L of the image size (``seg_channels`` gives
    their widths; nothing heavy runs at full resolution), the encoder tokens (1/p) are brought to
    the deepest level, and the decoder fuses and upsamples level by level back to full size.

    Args:
        cfg: model configuration.
        encoder: the encoder to use (the pretrained one); a fresh one when None.
    """

    def __init__(self, cfg: ModelConfig, encoder: ViTEncoder | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else ViTEncoder(cfg)
        dims, chans = cfg.spatial_dims, cfg.seg_channels
        levels = len(chans)
        # Skip path: one strided residual conv block per level, [B, c_i, *S / 2**(i+1)].
        self.skips = nn.ModuleList(
            UnetResBlock(dims, cfg.in_channels if i == 0 else chans[i - 1], chans[i], kernel_size=3, stride=2,
                         norm_name=NORM)
            for i in range(levels)
        )
        # Tokens at 1/p resolution to the deepest skip level 1/2**L.
        self.bottleneck = _conv_transpose(dims, cfg.embed_dim, chans[-1], cfg.patch_size // 2 ** levels)
        # Decoder: fuse with each level's skip, then upsample to the next shallower level.
        self.fuse = nn.ModuleList(
            UnetResBlock(dims, 2 * chans[i], chans[i], kernel_size=3, stride=1, norm_name=NORM)
            for i in range(levels)
        )
        self.up = nn.ModuleList(_conv_transpose(dims, chans[i], chans[i - 1], 2) for i in range(1, levels))
        # Full resolution: upsample to a few channels, join the image itself, a 1x1 conv to the classes.
        # (A 3x3 conv here would cost more than the whole ViT on a CPU.)
        full = max(chans[0] // 2, cfg.num_classes)
        self.to_full = _conv_transpose(dims, chans[0], full, 2)
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.head = nn.Sequential(nn.LeakyReLU(0.01), conv(full + cfg.in_channels, cfg.num_classes, kernel_size=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, *S]`` -> class logits ``[B, num_classes, *S]``."""
        skips = []
        x = images
        for block in self.skips:
            x = block(x)  # [B, c_i, *S / 2**(i+1)]
            skips.append(x)
        tokens = self.encoder(images)  # [B, N, D]
        x = self.bottleneck(tokens_to_grid(tokens, self.encoder.grid_size))  # [B, c_L, *S / 2**L]
        for i in reversed(range(len(skips))):
            x = self.fuse[i](torch.cat([x, skips[i]], dim=1))  # [B, c_i, *S / 2**(i+1)]
            if i > 0:
                x = self.up[i - 1](x)  # [B, c_{i-1}, *S / 2**i]
        x = self.to_full(x)  # [B, c_0 / 2, *S]
        return self.head(torch.cat([x, images], dim=1))  # [B, K, *S]
