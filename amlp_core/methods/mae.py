"""MAE baseline: uniformly random masking at a fixed ratio, plain reconstruction loss."""

from __future__ import annotations

import torch

from amlp_core.losses import plain_reconstruction_loss
from amlp_core.masking import random_mask
from amlp_core.methods.base import PretrainMethod, StepOutput, register_method


@register_method("mae")
class MAE(PretrainMethod):
    """MAE: uniformly random patches masked at the fixed ``method.mask_ratio``, plain reconstruction loss
    on the hidden patches (docs/methods.md, "MAE").

    Reference: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (arXiv:2111.06377).
    """

    def training_step(
        self, images: torch.Tensor, progress: float, generator: torch.Generator | None = None
    ) -> StepOutput:
        ratio = self.masking_ratio(progress)
        mask = random_mask(images.shape[0], self.model_cfg.num_patches, ratio, generator, device=images.device)
        l_masked = self.masked(self.reconstruct(images, mask), mask)  # [B, M]
        loss = plain_reconstruction_loss(l_masked)
        return StepOutput(loss, {"loss": loss.item(), "rec": loss.item(), "ratio": mask.ratio}, mask)
