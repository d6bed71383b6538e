"""Losses: reconstruction (plain, ARL/RRL), CCL, Dice + CE."""

from amlp_core.losses.consistency import category_consistency_loss, hard_targets, lesion_assignment
from amlp_core.losses.proximal import proximal_term
from amlp_core.losses.reconstruction import (
    masked_losses,
    normalize_patches,
    patch_losses,
    plain_reconstruction_loss,
    relative_reconstruction_loss,
    relative_weights,
)
from amlp_core.losses.segmentation import dice_ce_loss

__all__ = [
    "category_consistency_loss",
    "dice_ce_loss",
    "hard_targets",
    "lesion_assignment",
    "masked_losses",
    "normalize_patches",
    "patch_losses",
    "proximal_term",
    "plain_reconstruction_loss",
    "relative_reconstruction_loss",
    "relative_weights",
]
