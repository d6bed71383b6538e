"""One ViT encoder, two heads: the MAE decoder and the segmentation decoder (or a plain conv U-Net)."""

from amlp_core.models.mae import MAEDecoder
from amlp_core.models.segmentation import (SEG_ARCH_CLASSES, SegmentationNet, build_segmentation_model, has_encoder,
                                           plain_unet)
from amlp_core.models.vit import ViTEncoder, encoder_state, patchify, tokens_to_grid, unpatchify

__all__ = ["MAEDecoder", "SEG_ARCH_CLASSES", "SegmentationNet", "ViTEncoder", "build_segmentation_model",
           "encoder_state", "has_encoder", "patchify", "plain_unet", "tokens_to_grid", "unpatchify"]
