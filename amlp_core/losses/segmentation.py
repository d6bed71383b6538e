"""Segmentation loss: Dice + cross-entropy (MONAI)."""

from __future__ import annotations

from monai.losses import DiceCELoss


def dice_ce_loss() -> DiceCELoss:
    """Dice + CE on logits ``[B, K, *S]`` against integer labels ``[B, 1, *S]``."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
