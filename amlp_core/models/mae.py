"""The pretraining decoders: what the encoder saw of a masked image back to every patch's pixels.

``model.pretrain_decoder`` picks one (:func:`build_pretrain_decoder`):

- ``transformer`` (:class:`MAEDecoder`): MAE's light transformer on the visible tokens only;
- ``unet`` (:class:`DenseDecoder`): SparK's multi-scale decoder. Every conv stage's map and the
  tokens are made dense again (a learned mask embedding per scale where patches are hidden) and a
  U-Net decoder of the segmentation decoder's shape predicts the pixels, so every skip feature
  the segmentation decoder will read is trained to describe the image.

Both take the encoder's output on a masked image and return ``[B, N, C * p**dims]``.
"""

from __future__ import annotations

import torch
from torch import nn

from amlp_core.config import PRETRAIN_DECODERS, ModelConfig
from amlp_core.masking.base import Mask
from amlp_core.models.encoder import EncoderOutput, visible_map
from amlp_core.models.segmentation import UNetDecoder
from amlp_core.models.vit import patchify, sincos_position_embedding, tokens_to_grid, transformer_stack


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
        self.head = nn.Linear(cfg.decoder_dim, cfg.in_channels * cfg.patch_size**cfg.spatial_dims)

    def forward(self, features: EncoderOutput, mask: Mask) -> torch.Tensor:
        """Predict every patch from the visible tokens.

        Args:
            features: the encoder's output; its ``tokens`` ``[B, N_keep, D]`` are the visible patches',
                in ``mask.ids_keep`` order (its skips are not used).
            mask: the mask the encoder saw.

        Returns:
            ``[B, N, C * p**dims]`` pixel predictions in patch order.
        """
        x = _restore(self.proj(features.tokens), self.mask_token, mask)  # [B, N, Dd] patch order
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # [B, N, C * p**dims]


def _restore(visible: torch.Tensor, mask_token: LearnedToken, mask: Mask) -> torch.Tensor:
    """Visible tokens ``[B, N_keep, D]`` (``ids_keep`` order) + the mask token -> ``[B, N, D]`` in patch order."""
    b, n_keep, d = visible.shape
    hidden = mask_token(visible.new_zeros(b, mask.masked.shape[1] - n_keep, d))  # [B, N_mask, D]
    x = torch.cat([visible, hidden], dim=1)  # [B, N, D] in [kept..., masked...] order
    return torch.gather(x, 1, mask.ids_restore.unsqueeze(-1).expand(-1, -1, d))


class MaskFill(nn.Module):
    """A learned ``[c]`` embedding for the hidden positions of a feature map (SparK's mask embedding).

    Its forward takes one tensor (the hidden positions) so that Opacus can take per-case gradients.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, 1, *S_i]`` 1 where hidden, 0 where visible -> ``[B, c, *S_i]`` the embedding where hidden, 0 elsewhere."""
        return hidden * self.weight.to(hidden.dtype).view(1, -1, *([1] * (hidden.dim() - 2)))


class DenseDecoder(nn.Module):
    """SparK-style multi-scale pretraining decoder: densify every scale, U-Net decode to pixels.

    The tokens get MAE's mask token at the hidden patches and go back onto the patch grid; each
    skip gets a learned fill at its hidden positions. A :class:`UNetDecoder` (the segmentation
    decoder's shape, ``C`` outputs) then predicts the image, cut into patches like the target.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mask_token = LearnedToken(cfg.embed_dim)
        self.fills = nn.ModuleList(MaskFill(c) for c in cfg.conv_channels)
        self.unet = UNetDecoder(cfg, out_channels=cfg.in_channels)

    def forward(self, features: EncoderOutput, mask: Mask) -> torch.Tensor:
        """The encoder's skips ``[B, c_i, *S / 2**i]`` and visible tokens ``[B, N_keep, D]`` -> ``[B, N, P]``."""
        grid, visible = self.cfg.grid_size, ~mask.masked
        tokens = _restore(features.tokens, self.mask_token, mask)  # [B, N, D] patch order
        skips = []
        for fill, skip in zip(self.fills, features.skips):  # hidden positions of a skip are 0: fill them
            vis = visible_map(visible, grid, tuple(skip.shape[2:]), skip.dtype)  # [B, 1, *S / 2**i]
            assert vis is not None  # a mask always gives a map
            skips.append(skip * vis + fill(1 - vis))  # [B, c_i, *S / 2**i], dense
        image = self.unet(skips, tokens_to_grid(tokens, grid))  # [B, C, *S]
        return patchify(image, self.cfg.patch_size)  # [B, N, C * p**dims]


#: ``model.pretrain_decoder`` (the config's closed set, PRETRAIN_DECODERS) -> its class.
DECODER_CLASSES: dict[str, type[nn.Module]] = {"transformer": MAEDecoder, "unet": DenseDecoder}
if set(DECODER_CLASSES) != set(PRETRAIN_DECODERS):
    raise ImportError(f"pretraining decoders {sorted(DECODER_CLASSES)} differ from the config's {PRETRAIN_DECODERS}")


def build_pretrain_decoder(cfg: ModelConfig) -> nn.Module:
    """The pretraining decoder named by ``cfg.pretrain_decoder``, freshly initialised."""
    return DECODER_CLASSES[cfg.pretrain_decoder](cfg)
