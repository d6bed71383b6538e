"""The global model's first weights: what a federation (or a test) starts each phase from.

Seeded by ``train.seed``, so the server of a resumed run and every run of the same config start alike.
"""

from __future__ import annotations

import torch

from amlp_core.config import Config
from amlp_core.engine.device import seed_everything
from amlp_core.errors import CheckpointError, ConfigError
from amlp_core.methods import build_method
from amlp_core.models import (
    SegmentationNet,
    build_segmentation_model,
    encoder_state,
    has_encoder,
    pretrained_decoder_state,
)


def initial_shared_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The first pretraining round's weights: the method's shared weights (the encoder, plus what the
    method shares), freshly initialised with ``train.seed``."""
    seed_everything(cfg.train.seed)
    return build_method(cfg.model, cfg.method).shared_state_dict()


def initial_segmentation_state(
    cfg: Config, shared: dict[str, torch.Tensor] | None, where: str = "the aggregated encoder"
) -> dict[str, torch.Tensor]:
    """The first fine-tuning round's network (``model.seg_arch``), seeded with ``train.seed + 1``.

    ``vit``: the encoder from ``shared`` (a method's shared weights, keys under ``encoder.``; strict load)
    and a fresh decoder, or with ``train.init_decoder`` one started from the SparK U-Net decoder in ``shared``
    (every level but the output). ``unet``: a fresh plain U-Net; it has no encoder, so ``shared`` must be None.

    Raises:
        CheckpointError: the encoder (from ``where``) does not fit the configured model.
    """
    seed_everything(cfg.train.seed + 1)
    model = build_segmentation_model(cfg.model)
    if not has_encoder(cfg.model):
        if shared is not None:  # the config refuses pretraining rounds and init_encoder for it
            raise ConfigError(f"model.seg_arch={cfg.model.seg_arch} has no encoder to load")
        return model.state_dict()
    if shared is None:
        raise ConfigError(f"model.seg_arch={cfg.model.seg_arch} needs an encoder to start fine-tuning from")
    assert isinstance(model, SegmentationNet)  # has_encoder: the ViT network
    try:
        model.encoder.load_state_dict(encoder_state(shared), strict=True)
        if cfg.train.init_decoder:
            model.load_pretrained_decoder(pretrained_decoder_state(shared))
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"the pretrained weights from {where} do not fit model {cfg.model}: {e}") from None
    return model.state_dict()
