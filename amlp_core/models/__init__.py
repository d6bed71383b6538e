"""One encoder (conv stages + ViT), two heads: the MAE decoder and the segmentation decoder (or a plain U-Net)."""

from amlp_core.models.encoder import EncoderOutput, HybridEncoder, masked_instance_norm, visible_map
from amlp_core.models.mae import DenseDecoder, MAEDecoder, build_pretrain_decoder
from amlp_core.models.segmentation import (
    PRETRAIN_UNET_PREFIX,
    SEG_ARCH_CLASSES,
    SegmentationNet,
    UNetDecoder,
    build_segmentation_model,
    has_encoder,
    plain_unet,
    pretrained_decoder_state,
)
from amlp_core.models.vit import encoder_state, patchify, tokens_to_grid, unpatchify

__all__ = [
    "DenseDecoder",
    "EncoderOutput",
    "HybridEncoder",
    "MAEDecoder",
    "PRETRAIN_UNET_PREFIX",
    "SEG_ARCH_CLASSES",
    "SegmentationNet",
    "UNetDecoder",
    "build_pretrain_decoder",
    "build_segmentation_model",
    "encoder_state",
    "has_encoder",
    "masked_instance_norm",
    "patchify",
    "plain_unet",
    "pretrained_decoder_state",
    "tokens_to_grid",
    "unpatchify",
    "visible_map",
]
