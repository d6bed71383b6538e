"""Pretext methods: one object per method, ``images -> loss, metrics``.

A method owns the encoder (what the federation shares), its MAE decoder and whatever
state the method needs; :func:`build_method` picks one by name from :data:`METHODS`,
which new methods join with :func:`register_method` without touching the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from amlp_core.config import METHOD_NAMES, MethodConfig, ModelConfig
from amlp_core.errors import ConfigError
from amlp_core.losses import masked_losses, normalize_patches, patch_losses
from amlp_core.masking import Mask
from amlp_core.models import PRETRAIN_UNET_PREFIX, HybridEncoder, build_pretrain_decoder, patchify
from amlp_core.schedules import amr_ratio


@dataclass
class StepOutput:
    """What one training step returns: the loss to minimise, scalar metrics, the mask used."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    mask: Mask | None = None


class PretrainMethod(nn.Module):
    """Base of the masked-image-modelling methods: encoder + MAE decoder + a masking rule."""

    name: ClassVar[str] = ""
    uses_amr: ClassVar[bool] = False
    #: State-dict prefixes that a federation aggregates (the rest stays at the site).
    shared_prefixes: ClassVar[tuple[str, ...]] = ("encoder.",)
    #: Whether the method reconstructs pixels with the MAE decoder (one that does not gets none).
    uses_decoder: ClassVar[bool] = True

    def __init__(self, model_cfg: ModelConfig, method_cfg: MethodConfig, private: bool = False) -> None:
        """``private``: trained under DP-SGD, where no statistic of the cases may steer training outside the
        noised gradients, so the method freezes such state (e.g. MPS's running per-group loss)."""
        super().__init__()
        self.private = private
        self.model_cfg = model_cfg
        self.method_cfg = method_cfg
        self.encoder = HybridEncoder(model_cfg)
        self.decoder = build_pretrain_decoder(model_cfg) if self.uses_decoder else None

    @classmethod
    def ratio_at(cls, method_cfg: MethodConfig, progress: float) -> float:
        """Masking ratio at training progress ``progress`` in [0, 1]: AMR, or the fixed ratio."""
        m = method_cfg
        if cls.uses_amr:
            return amr_ratio(progress, m.amr_start, m.amr_end, m.amr_schedule)
        return m.mask_ratio

    def masking_ratio(self, progress: float) -> float:
        return self.ratio_at(self.method_cfg, progress)

    def predict_patches(self, images: torch.Tensor, mask: Mask, first: torch.Tensor | None = None) -> torch.Tensor:
        """Encode what the mask shows (hidden patches zeroed at every scale), decode every patch.

        Args:
            images: ``[B, C, *S]``.
            mask: which patches are hidden.
            first: the encoder's first conv of the unmasked images, when already computed (MPS).

        Returns:
            ``[B, N, P]`` the predicted (per-patch normalised) pixels of every patch, ``P = C * p**dims``.
        """
        if self.decoder is None:
            raise TypeError(f"{type(self).__name__} has no pixel decoder (uses_decoder is False)")
        features = self.encoder(images, ~mask.masked, mask.ids_keep, first)  # skips, tokens [B, N_keep, D]
        return self.decoder(features, mask)  # [B, N, P]

    def reconstruct(self, images: torch.Tensor, mask: Mask, first: torch.Tensor | None = None) -> torch.Tensor:
        """Per-patch reconstruction loss ``l_i`` ``[B, N]`` of ``images`` ``[B, C, *S]`` under ``mask``
        (meaningful on the masked patches)."""
        pred = self.predict_patches(images, mask, first)  # [B, N, P]
        return patch_losses(pred, normalize_patches(self.patchify(images)))  # [B, N]

    def training_step(
        self, images: torch.Tensor, progress: float, generator: torch.Generator | None = None
    ) -> StepOutput:
        """One step on ``images`` ``[B, C, *S]`` at training progress ``progress`` in [0, 1]."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups, each with an ``lr_scale`` of the base learning rate."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a federation aggregates: the encoder, what the method must share, and SparK's U-Net
        decoder (``model.pretrain_decoder=unet``), the one a segmentation decoder can start from
        (``train.init_decoder``); the transformer decoder stays at the site."""
        prefixes = self.shared_prefixes
        if self.decoder is not None and self.model_cfg.pretrain_decoder == "unet":
            prefixes = (*prefixes, PRETRAIN_UNET_PREFIX)
        return {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.model_cfg.patch_size)  # [B, N, P]

    @staticmethod
    def masked(per_patch: torch.Tensor, mask: Mask) -> torch.Tensor:
        return masked_losses(per_patch, mask.ids_masked)  # [B, M]


METHODS: dict[str, type[PretrainMethod]] = {}


def register_method(name: str) -> Callable[[type[PretrainMethod]], type[PretrainMethod]]:
    """Class decorator adding a method to :data:`METHODS` under ``name``."""

    def add(cls: type[PretrainMethod]) -> type[PretrainMethod]:
        if name not in METHOD_NAMES:  # the config's closed set (method.name) is the one list of names
            raise ValueError(f"pretraining method {name!r} is not in amlp_core.config METHOD_NAMES")
        if name in METHODS:
            raise ValueError(f"pretraining method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def method_class(name: str) -> type[PretrainMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown pretraining method {name!r}; available: {', '.join(METHODS)}") from None


def build_method(model_cfg: ModelConfig, method_cfg: MethodConfig, private: bool = False) -> PretrainMethod:
    """The method named ``method_cfg.name``, freshly initialised (``private``: to be trained under DP-SGD)."""
    return method_class(method_cfg.name)(model_cfg, method_cfg, private)


def mask_ratio_at(method_cfg: MethodConfig, progress: float) -> float:
    """The masking ratio method ``method_cfg.name`` uses at training progress ``progress``."""
    return method_class(method_cfg.name).ratio_at(method_cfg, progress)
