"""One ViT encoder, two heads: the MAE decoder and the segmentation decoder."""

from amlp_core.models.mae import MAEDecoder
from amlp_core.models.segmentation import SegmentationNet
from amlp_core.models.vit import ViTEncoder, encoder_state, patchify, tokens_to_grid, unpatchify

__all__ = ["MAEDecoder", "SegmentationNet", "ViTEncoder", "encoder_state", "patchify", "tokens_to_grid", "unpatchify"]
