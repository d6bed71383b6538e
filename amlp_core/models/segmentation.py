"""Segmentation network: the pretrained encoder and a light convolutional U-Net decoder.

The encoder (:class:`~amlp_core.models.encoder.HybridEncoder`) is the whole down path: its conv
stages give the skip features at 1/2, ..., 1/2**L and its ViT the tokens on the patch grid. Only
the decoder is new at fine-tuning: the tokens are projected to the deepest stage's grid and joined
to its features, then each level upsamples (transposed conv + residual unit, as MONAI's ``UNet``)
and takes the skip of its resolution. Nothing is wide at full resolution: UNETR-style decoders
with full-resolution feature maps cost far more on a CPU (docs/results.md, how results are measured).

:func:`build_segmentation_model` picks the network named by ``model.seg_arch``: this one
(``vit``) or MONAI's plain conv ``UNet`` (``unet``), the baseline every pretraining gain is
measured against.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import UNet
from torch import nn

from amlp_core.config import ModelConfig
from amlp_core.models.encoder import HybridEncoder

# MONAI UNet's defaults. No BatchNorm (Opacus's per-sample gradients need that). Measured on the
# hippocampus data: with LeakyReLU(0.01) and affine instance norm the same network stalled at a
# Dice+CE loss of about 0.75 where these settings go on down with the plain U-Net.
NORM = "instance"
ACT = "PRELU"
#: The plain U-Net (docs/results.md, how results are measured, the floor to beat): widths at full, 1/2, 1/4 and 1/8 resolution.
UNET_CHANNELS = (16, 32, 64, 128)


def _tokens_to_level(dims: int, cin: int, cout: int, factor: int) -> nn.Module:
    """Project tokens ``[B, D, *G]`` to ``[B, cout, *G * factor]``."""
    if factor == 1:
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        return conv(cin, cout, kernel_size=1)
    conv_t = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
    return conv_t(cin, cout, kernel_size=factor, stride=factor)


class UNetDecoder(nn.Module):
    """Skips ``[B, c_i, *S / 2**i]`` (i = 1..L) and the token map ``[B, D, *G]`` -> logits ``[B, K, *S]``.

    The bottom unit at 1/2**L is ``2 * c_L`` wide and takes the deepest skip and the projected tokens.
    ``out_channels``: ``K``, the classes (``model.num_classes``) unless given (SparK's pretraining
    decoder predicts the image's channels).
    """

    def __init__(self, cfg: ModelConfig, out_channels: int | None = None) -> None:
        super().__init__()
        out = cfg.num_classes if out_channels is None else out_channels
        dims, chans, levels = cfg.spatial_dims, cfg.conv_channels, len(cfg.conv_channels)
        self.tokens_in = _tokens_to_level(dims, cfg.embed_dim, chans[-1], cfg.patch_size // 2**levels)
        bottom = 2 * chans[-1]
        self.bottom = ResidualUnit(dims, 2 * chans[-1], bottom, strides=1, subunits=2, act=ACT, norm=NORM)
        self.up = nn.ModuleList()
        for i in range(levels):  # up[i] takes cat(skip_i, x) at 1/2**(i+1) and returns 1/2**i
            cin = chans[i] + (bottom if i == levels - 1 else chans[i])
            cout = out if i == 0 else chans[i - 1]
            self.up.append(
                nn.Sequential(
                    Convolution(
                        dims,
                        cin,
                        cout,
                        strides=2,
                        kernel_size=3,
                        act=ACT,
                        norm=NORM,
                        is_transposed=True,
                        conv_only=False,
                    ),
                    ResidualUnit(dims, cout, cout, strides=1, subunits=1, act=ACT, norm=NORM, last_conv_only=i == 0),
                )
            )

    def forward(self, skips: list[torch.Tensor], token_map: torch.Tensor) -> torch.Tensor:
        x = self.bottom(torch.cat([skips[-1], self.tokens_in(token_map)], dim=1))  # [B, 2 c_L, *S / 2**L]
        for i in reversed(range(len(skips))):
            x = self.up[i](torch.cat([skips[i], x], dim=1))  # [B, c_{i-1} (K at i=0), *S / 2**i]
        return x


#: Where SparK's pretraining decoder keeps its U-Net in a pretraining method's state (``DenseDecoder.unet``).
PRETRAIN_UNET_PREFIX = "decoder.unet."
#: The level of :class:`UNetDecoder` at full resolution: it outputs classes here and image channels in
#: pretraining, so it always starts fresh.
OUTPUT_LEVEL = "up.0."


def pretrained_decoder_state(method_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a segmentation :class:`UNetDecoder` takes from a pretraining method's state dict: the U-Net of
    SparK's pretraining decoder, all but :data:`OUTPUT_LEVEL` (keys relative to the decoder; empty
    when the method had the transformer decoder)."""
    return {
        k[len(PRETRAIN_UNET_PREFIX) :]: v
        for k, v in method_state.items()
        if k.startswith(PRETRAIN_UNET_PREFIX) and not k[len(PRETRAIN_UNET_PREFIX) :].startswith(OUTPUT_LEVEL)
    }


class SegmentationNet(nn.Module):
    """The encoder (pretrained, or fresh) and a fresh :class:`UNetDecoder`.

    Args:
        cfg: model configuration.
        encoder: the encoder to use (the pretrained one); a fresh one when None.
    """

    def __init__(self, cfg: ModelConfig, encoder: HybridEncoder | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else HybridEncoder(cfg)
        self.decoder = UNetDecoder(cfg)

    def load_pretrained_decoder(self, state: dict[str, torch.Tensor]) -> None:
        """Load :func:`pretrained_decoder_state`: every decoder tensor but :data:`OUTPUT_LEVEL`'s, strictly.

        Raises:
            ValueError: a tensor is missing, unexpected or of another shape (the message names it).
        """
        own = {k: v for k, v in self.decoder.state_dict().items() if not k.startswith(OUTPUT_LEVEL)}
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or extra or wrong:
            raise ValueError(
                f"the pretraining decoder does not fit the segmentation decoder: missing {missing[:3]}, "
                f"unexpected {extra[:3]}, other shape {wrong[:3]}"
            )
        self.decoder.load_state_dict(state, strict=False)

    def pretrained_names(self, with_decoder: bool) -> set[str]:
        """Names of the parameters a pretraining run gives: the encoder's, and with ``with_decoder`` the
        decoder's but :data:`OUTPUT_LEVEL`'s."""
        return {
            n
            for n, _ in self.named_parameters()
            if n.startswith("encoder.")
            or (with_decoder and n.startswith("decoder.") and not n.startswith("decoder." + OUTPUT_LEVEL))
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, *S]`` -> class logits ``[B, num_classes, *S]``."""
        features = self.encoder(images)  # skips [B, c_i, *S / 2**i], tokens [B, N, D]
        return self.decoder(features.skips, self.encoder.token_grid(features.tokens))


def plain_unet(cfg: ModelConfig) -> UNet:
    """MONAI's residual ``UNet``: channels 16-128, three stride-2 levels, instance norm (no BatchNorm,
    so Opacus' per-case gradients work), no encoder. Sizes must be multiples of 8 (the config checks)."""
    strides = (2,) * (len(UNET_CHANNELS) - 1)  # 2 ** len(strides) == config.UNET_FACTOR (its size check)
    return UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.num_classes,
        channels=UNET_CHANNELS,
        strides=strides,
        num_res_units=2,
        norm=NORM,
    )


#: ``model.seg_arch`` -> the class :func:`build_segmentation_model` returns for it.
SEG_ARCH_CLASSES: dict[str, type[nn.Module]] = {"vit": SegmentationNet, "unet": UNet}


def build_segmentation_model(cfg: ModelConfig) -> nn.Module:
    """The segmentation network named by ``cfg.seg_arch``, freshly initialised.

    ``vit``: :class:`SegmentationNet` (its ``encoder`` takes a pretrained encoder's weights);
    ``unet``: :func:`plain_unet` (no encoder: trained from scratch only).

    Both map images ``[B, in_channels, *img_size]`` to class logits ``[B, num_classes, *img_size]``,
    in 2D and 3D (``cfg.spatial_dims``).

    Raises:
        ValueError: an unknown ``seg_arch`` (a validated :class:`ModelConfig` never has one).
    """
    if cfg.seg_arch == "vit":
        return SegmentationNet(cfg)
    if cfg.seg_arch == "unet":
        return plain_unet(cfg)
    raise ValueError(f"unknown model.seg_arch={cfg.seg_arch!r}: expected one of {', '.join(SEG_ARCH_CLASSES)}")


def has_encoder(cfg: ModelConfig) -> bool:
    """Whether the segmentation network of ``cfg`` has the pretrainable encoder (loadable)."""
    return cfg.seg_arch == "vit"
