"""The one encoder: conv stages at 1/2, ..., 1/2**L, then a ViT on the patch grid.

It is the segmentation network's whole down path (every skip feature comes from it) and
what every pretraining method trains, so nothing the network segments with is left
unpretrained (docs/methods.md, "The encoder every method trains").

A mask lives on the patch grid ``G = S / p`` (the grid MPS clusters, AMR sizes and AHM
samples). It is honoured at every scale, as in SparK: the hidden patches are zeroed in the
image, and again after every convolution at the resolution of that stage (the mask upsampled
to it), and the instance normalisation takes its statistics over the visible positions only.
Every stage downsamples with a ``2 x 2`` stride-2 convolution, which never reads across a
patch border, and the ViT sees the visible tokens only. So nothing of a masked voxel reaches a
visible feature; ``tests/core/test_encoder.py`` proves it by changing only masked voxels.

Shapes: ``B`` batch, ``C`` channels, ``*S`` the spatial size, ``c_i`` the width of stage ``i``
(``model.conv_channels``), ``*G`` the patch grid, ``N = prod(G)`` patches, ``D`` the ViT width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from amlp_core.config import ModelConfig
from amlp_core.models.vit import sincos_position_embedding, tokens_to_grid, transformer_stack

EPS = 1e-5


def visible_map(
    visible: torch.Tensor | None,
    grid_size: tuple[int, ...],
    spatial: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """The patch-grid visibility at a feature map's resolution.

    Args:
        visible: ``[B, N]`` bool (True = the patch is shown), or None (everything visible).
        grid_size: the patch grid ``G``.
        spatial: the map's spatial size ``S_i``, a multiple of ``G`` along every axis.

    Returns:
        ``[B, 1, *S_i]`` of 1 (visible) and 0 (hidden), or None.
    """
    if visible is None:
        return None
    grid = visible.reshape(visible.shape[0], 1, *grid_size).to(dtype)  # [B, 1, *G]
    factor = spatial[0] // grid_size[0]
    return grid if factor == 1 else F.interpolate(grid, scale_factor=factor, mode="nearest")


def masked_instance_norm(x: torch.Tensor, vis: torch.Tensor | None) -> torch.Tensor:
    """Instance normalisation over the visible positions only; hidden positions come out 0.

    Args:
        x: ``[B, c, *S_i]``.
        vis: ``[B, 1, *S_i]`` 0/1 visibility, or None (plain instance norm, no affine).

    Returns:
        ``[B, c, *S_i]``.
    """
    if vis is None:
        return F.instance_norm(x, eps=EPS)
    dims = tuple(range(2, x.dim()))
    count = vis.sum(dim=dims, keepdim=True).clamp_min(1.0)  # [B, 1, 1...]
    mean = (x * vis).sum(dim=dims, keepdim=True) / count  # [B, c, 1...]
    var = ((x - mean) ** 2 * vis).sum(dim=dims, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + EPS) * vis


class ConvStage(nn.Module):
    """Halve the resolution (``2 x 2`` stride-2 conv), then one residual block of two 3x3 convs.

    Each conv is followed by :func:`masked_instance_norm` (which also re-zeroes the hidden
    positions) and a PReLU (0 stays 0), so hidden positions stay 0 all the way through.
    """

    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.down = conv(cin, cout, kernel_size=2, stride=2)
        self.conv1 = conv(cout, cout, kernel_size=3, padding=1)
        self.conv2 = conv(cout, cout, kernel_size=3, padding=1)
        self.act0, self.act1, self.act2 = nn.PReLU(), nn.PReLU(), nn.PReLU()

    def normalized(self, down: torch.Tensor, vis: torch.Tensor | None = None) -> torch.Tensor:
        """The downsampling conv's output ``[B, cout, *S / 2]`` normalised (over ``vis``) and activated."""
        return self.act0(masked_instance_norm(down, vis))

    def forward(
        self,
        x: torch.Tensor,
        visible: torch.Tensor | None,
        grid_size: tuple[int, ...],
        down: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, cin, *S]`` (hidden positions 0) -> ``[B, cout, *S / 2]`` (hidden positions 0).

        ``down``: ``self.down`` of the *unmasked* input, when the caller has it already. The conv is
        patch-local, so on the visible positions it equals the conv of the masked input, and the
        masked norm zeroes the hidden ones: the result is the same, one conv cheaper.
        """
        down = self.down(x) if down is None else down  # [B, cout, *S/2]
        vis = visible_map(visible, grid_size, tuple(down.shape[2:]), down.dtype)
        x = self.normalized(down, vis)  # [B, cout, *S/2]
        h = self.act1(masked_instance_norm(self.conv1(x), vis))
        h = masked_instance_norm(self.conv2(h), vis)
        return self.act2(x + h)


@dataclass
class EncoderOutput:
    """What the encoder gives its heads.

    Attributes:
        skips: the conv stages' outputs ``[B, c_i, *S / 2**i]``, ``i = 1..L`` (hidden positions 0).
        tokens: ``[B, N_keep, D]`` the ViT's output on the visible patches (all ``N`` without a mask),
            layer-normalised, in the order of ``ids_keep``.
    """

    skips: list[torch.Tensor]
    tokens: torch.Tensor


class HybridEncoder(nn.Module):
    """Conv stages (``model.conv_channels`` wide, 1/2 ... 1/2**L), patch embedding, ViT blocks.

    The stages read like the method:

    - :meth:`first_conv` and :meth:`stem`: the first stage's downsampling conv on the whole image,
      normalised (MPS's patch features); the first conv is shared with the masked pass;
    - :meth:`conv_stages`: the image with hidden patches zeroed, through every stage;
    - :meth:`embed`: the last stage's map to patch tokens ``[B, N, D]`` (a ``p / 2**L`` strided conv);
    - :meth:`encode`: positions, the visible tokens only, the transformer.

    Args:
        cfg: the model configuration (``spatial_dims``, ``in_channels``, ``img_size``, ``patch_size``,
            ``conv_channels``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims, chans = cfg.spatial_dims, cfg.conv_channels
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.stages = nn.ModuleList(
            ConvStage(dims, cfg.in_channels if i == 0 else chans[i - 1], chans[i]) for i in range(len(chans))
        )
        factor = cfg.patch_size // 2 ** len(chans)  # the last stage's resolution -> the patch grid
        self.patch_embed = conv(chans[-1], cfg.embed_dim, kernel_size=factor, stride=factor)
        self.pos_embed = sincos_position_embedding(cfg.grid_size, cfg.embed_dim)
        self.blocks = transformer_stack(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.embed_dim)

    @property
    def first_stage(self) -> ConvStage:
        """The conv stage at 1/2 resolution (MPS's features come from its first conv)."""
        stage = self.stages[0]
        assert isinstance(stage, ConvStage)
        return stage

    @property
    def grid_size(self) -> tuple[int, ...]:
        return self.cfg.grid_size

    def check_images(self, images: torch.Tensor) -> None:
        expected = (self.cfg.in_channels, *self.cfg.img_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"encoder expects images of shape [B, {', '.join(map(str, expected))}], got {list(images.shape)}"
            )

    def first_conv(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, *S]`` -> ``[B, c_1, *S / 2]``: the first stage's ``2 x 2`` stride-2 conv of the unmasked image."""
        self.check_images(images)
        return self.first_stage.down(images)

    def stem(self, first: torch.Tensor) -> torch.Tensor:
        """The first conv's output ``[B, c_1, *S / 2]`` (:meth:`first_conv`), normalised over the whole
        image and activated: the encoder's own description of every position, which MPS clusters."""
        return self.first_stage.normalized(first)

    def conv_stages(
        self, images: torch.Tensor, visible: torch.Tensor | None = None, first: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``[B, C, *S]`` -> ``[[B, c_i, *S / 2**i] for i = 1..L]``, hidden patches zeroed at every scale.

        Args:
            visible: ``[B, N]`` bool (True = shown), or None for the whole image.
            first: :meth:`first_conv` of the same (unmasked) images, when the caller has it already.
        """
        self.check_images(images)
        vis = visible_map(visible, self.grid_size, tuple(images.shape[2:]), images.dtype)
        x = images if vis is None else images * vis  # [B, C, *S], hidden voxels 0
        skips = []
        for i, stage in enumerate(self.stages):
            x = stage(x, visible, self.grid_size, first if i == 0 else None)  # [B, c_i, *S / 2**i]
            skips.append(x)
        return skips

    def embed(self, deepest: torch.Tensor) -> torch.Tensor:
        """The last stage's map ``[B, c_L, *S / 2**L]`` -> patch tokens ``[B, N, D]`` (before positions)."""
        return self.patch_embed(deepest).flatten(2).transpose(1, 2)

    def encode(self, tokens: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Add positions, keep the visible tokens, run the transformer.

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

    def forward(
        self,
        images: torch.Tensor,
        visible: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
        first: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """``[B, C, *S]`` -> skips ``[B, c_i, *S / 2**i]`` and tokens ``[B, N_keep, D]``.

        ``visible`` ``[B, N]`` and ``ids_keep`` ``[B, N_keep]`` describe the same mask (see
        :class:`~amlp_core.masking.Mask`); both None: the whole image. ``first``: :meth:`first_conv`
        of the unmasked images, when the caller has it already (MPS).
        """
        skips = self.conv_stages(images, visible, first)  # [B, c_i, *S / 2**i]
        tokens = self.embed(skips[-1])  # [B, N, D]
        return EncoderOutput(skips, self.encode(tokens, ids_keep))

    def token_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """All ``N`` tokens ``[B, N, D]`` -> the feature map ``[B, D, *G]``."""
        return tokens_to_grid(tokens, self.grid_size)
