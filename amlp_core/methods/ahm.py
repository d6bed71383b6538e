"""AHM: masked autoencoding whose mask is chosen by an actor-critic agent (docs/methods.md).

The MAE and the agent train together in one step: the agent scores the patches, its
policy draws the mask (no gradient), the MAE reconstructs, and the masked patches' losses
are the agent's rewards. Total loss = plain reconstruction loss + actor loss + critic loss;
the agent's parameters and the MAE's do not overlap, so each part only moves its own.

In a federation the sites are A3C's asynchronous workers: the agent (``agent.``) is
aggregated with the encoder; its optimizer state stays at the site with the decoder's.
The masking ratio is the fixed ``method.mask_ratio``.
"""

from __future__ import annotations

import torch

from amlp_core.config import MethodConfig, ModelConfig
from amlp_core.losses import plain_reconstruction_loss
from amlp_core.masking.ahm import AHMMasking
from amlp_core.methods.base import PretrainMethod, StepOutput, register_method


@register_method("ahm")
class AHM(PretrainMethod):
    """AHM: the mask drawn by an actor-critic agent that learns which patches are hard to reconstruct
    (the module docstring); the agent is shared with the encoder in a federation.

    Reference: adaptive hard masking, IEEE TMI 2024 (docs/methods.md, "AHM")."""

    shared_prefixes = ("encoder.", "agent.")

    def __init__(self, model_cfg: ModelConfig, method_cfg: MethodConfig, private: bool = False) -> None:
        super().__init__(model_cfg, method_cfg, private)
        self.agent = AHMMasking(
            model_cfg.spatial_dims,
            model_cfg.in_channels,
            model_cfg.patch_size,
            entropy_weight=method_cfg.ahm_entropy_weight,
        )

    def param_groups(self) -> list[dict]:
        """The MAE at the base learning rate, the agent at ``method.ahm_agent_lr_scale`` times it."""
        agent = [p for n, p in self.named_parameters() if n.startswith("agent.")]
        rest = [p for n, p in self.named_parameters() if not n.startswith("agent.")]
        return [{"params": rest, "lr_scale": 1.0}, {"params": agent, "lr_scale": self.method_cfg.ahm_agent_lr_scale}]

    def training_step(
        self, images: torch.Tensor, progress: float, generator: torch.Generator | None = None
    ) -> StepOutput:
        ratio = self.masking_ratio(progress)
        scores = self.agent(images)  # logits, predicted losses [B, N]
        draw = self.agent.select(scores, ratio, generator)  # the policy's draw, no gradient
        mask = draw.mask
        per_patch = self.reconstruct(images, mask)  # [B, N]
        rec = plain_reconstruction_loss(self.masked(per_patch, mask))
        agent = self.agent.losses(scores, draw, per_patch)
        loss = rec + agent.total
        metrics = {
            "loss": loss.item(),
            "rec": rec.item(),
            "ratio": mask.ratio,
            "actor": agent.actor.item(),
            "critic": agent.critic.item(),
            "entropy": agent.entropy.item(),
        }
        return StepOutput(loss, metrics, mask)
