"""AHM, adaptive hard masking: an actor-critic masking agent (docs/methods.md).

A small CNN looks at the image and gives, for every patch, a logit (the actor) and a
predicted reconstruction loss (the critic). The policy samples ``r * N`` patches without
replacement from ``softmax(logits)`` (Gumbel top-k with the caller's seeded generator, no
gradient) and returns the :class:`~amlp_core.masking.Mask`; the MAE then reconstructs, and the
masked patches' losses are the agent's rewards.

Choices where the specification is open, and why:

- **log pi of a sample without replacement.** Gumbel top-k is an exact Plackett-Luce draw: the
  patches in the order of their perturbed logits, each drawn from ``softmax(logits)`` renormalised
  over the patches not drawn yet. ``log pi`` of the ordered draw is the sum over the masked
  patches of their log-softmax *among the patches still available* when they were drawn, and
  each term is scored with that patch's own advantage (each draw is an action with its own
  reward). The plain log-softmax over all N patches is not used: a patch drawn only to fill the
  ``r * N`` budget has a vanishing probability under the full softmax, its log-probability has no
  floor, and the actor then diverges (tried: the actor loss went below -200 within 60 steps, the
  policy's entropy to 0.1 nats). The actor term is divided by ``|M|`` so that its scale does not
  depend on the patch count.
- **The baseline.** The critic predicts each patch's loss ``c_i``. Subtracting the drawn patch's
  own ``c_i`` would make its expected advantage zero (a baseline that depends on the action
  cancels the signal), so the actor would learn nothing once the critic is right. The advantage
  of the j-th draw is ``A_j = r_j - V_j``, with the critic's *state value* ``V_j``: the loss the
  critic expects from the j-th draw, ``sum_k pi_j(k) c_k`` over the patches still available.
  Rewards and values are detached.
- **Entropy** is that of the first draw's distribution, ``softmax(logits)`` over the N patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from amlp_core.masking.base import Mask, num_masked


class MaskingAgent(nn.Module):
    """The agent's network: image ``[B, C, *S]`` -> per-patch logits and predicted losses ``[B, N]``.

    A stride-2 3x3 convolution, a patchifying convolution down to the patch grid, one 3x3
    convolution for context between neighbouring patches, then two 1x1 heads (actor, critic).
    The actor head starts at zero: the first masks are uniformly random.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        patch_size: the encoder's patch side ``p`` (the agent's output grid is the patch grid).
        width: channels of the hidden layers.
    """

    def __init__(self, spatial_dims: int, in_channels: int, patch_size: int, width: int = 32) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        stem = 2 if patch_size % 2 == 0 else 1
        self.features = nn.Sequential(
            conv(in_channels, width // 2, kernel_size=3, stride=stem, padding=1),
            nn.GELU(),
            conv(width // 2, width, kernel_size=patch_size // stem, stride=patch_size // stem),
            nn.GELU(),
            conv(width, width, kernel_size=3, padding=1),
            nn.GELU(),
        )
        self.actor = conv(width, 1, kernel_size=1)
        self.critic = conv(width, 1, kernel_size=1)
        for p in self.actor.parameters():  # weight and bias: the policy starts uniform
            nn.init.zeros_(p)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, *S]`` -> ``(logits [B, N], predicted losses [B, N])``, patches in ``patchify`` order."""
        h = self.features(images)  # [B, W, *G]
        logits = self.actor(h).flatten(1)  # [B, N]
        values = self.critic(h).flatten(1)  # [B, N]
        return logits.float(), values.float()


@dataclass(frozen=True)
class AgentOutput:
    """The agent's view of one batch: ``logits`` and predicted per-patch losses ``values``, ``[B, N]``."""

    logits: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class Draw:
    """One draw of the policy: the mask, and the order in which the patches were drawn.

    Attributes:
        mask: the masked patches (the first ``M`` of ``order``).
        order: ``[B, N]`` every patch, by decreasing Gumbel-perturbed logit: the draw order of
            the masked patches, then the rest.
    """

    mask: Mask
    order: torch.Tensor


@dataclass(frozen=True)
class AgentLosses:
    """The agent's loss terms (scalars) and the policy's entropy (detached, for the log)."""

    actor: torch.Tensor
    critic: torch.Tensor
    entropy: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.actor + self.critic


def gumbel_order(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """All patches by decreasing Gumbel-perturbed logit: ``[B, N]`` -> ``[B, N]`` indices.

    The first ``k`` are an exact draw of ``k`` patches without replacement from ``softmax(logits)``,
    in the order drawn (Plackett-Luce).
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-12, 1.0 - 1e-7)
    keys = logits.detach().float() - torch.log(-torch.log(u))  # [B, N]
    return torch.argsort(keys, dim=1, descending=True)


def _suffix_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``out[:, j] = log sum_{k >= j} exp(x[:, k])``: ``[B, N]`` -> ``[B, N]``."""
    return torch.logcumsumexp(x.flip(1), dim=1).flip(1)


def plackett_luce(
    logits: torch.Tensor, values: torch.Tensor, order: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and critic baselines of the first ``k`` draws of ``order``.

    Args:
        logits: ``[B, N]`` the actor's logits (with gradient).
        values: ``[B, N]`` the critic's predicted losses (used detached).
        order: ``[B, N]`` the draw order (:func:`gumbel_order`).
        k: draws made.

    Returns:
        ``log_prob [B, k]``: ``log pi_j(i_j)``, the j-th drawn patch's log-softmax among the patches
        not drawn before it; ``baseline [B, k]``: ``sum_k pi_j(k) c_k`` over those same patches.
    """
    z = torch.gather(logits.float(), 1, order)  # [B, N] logits in draw order
    lse = _suffix_logsumexp(z)  # [B, N] normaliser of each draw
    log_prob = (z - lse)[:, :k]  # [B, k]
    with torch.no_grad():
        c = torch.gather(values.detach().float(), 1, order)  # [B, N]
        zd, lsed = z.detach(), lse.detach()
        # sum_k exp(z_k) c_k over each suffix, in the log domain, c split by sign.
        pos = _suffix_logsumexp(zd + torch.log(c.clamp_min(0)))
        neg = _suffix_logsumexp(zd + torch.log((-c).clamp_min(0)))
        baseline = (torch.exp(pos - lsed) - torch.exp(neg - lsed))[:, :k]  # [B, k]
    return log_prob, baseline


class AHMMasking(nn.Module):
    """Adaptive hard masking policy: the agent proposes, :meth:`select` returns the mask.

    Args:
        spatial_dims, in_channels, patch_size: the images' and the encoder's.
        entropy_weight: ``beta`` of the entropy bonus.
        width: hidden channels of the agent.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, patch_size: int, entropy_weight: float = 0.01, width: int = 32
    ) -> None:
        super().__init__()
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must not be negative, got {entropy_weight}")
        self.entropy_weight = entropy_weight
        self.net = MaskingAgent(spatial_dims, in_channels, patch_size, width)

    def forward(self, images: torch.Tensor) -> AgentOutput:
        """Score every patch of ``images`` ``[B, C, *S]`` (with gradient, for the agent's losses)."""
        logits, values = self.net(images)
        return AgentOutput(logits, values)

    @torch.no_grad()
    def select(self, scores: AgentOutput, ratio: float, generator: torch.Generator | None = None) -> Draw:
        """Draw ``round(ratio * N)`` patches per image without replacement from ``softmax(logits)``."""
        order = gumbel_order(scores.logits, generator)  # [B, N]
        k = num_masked(order.shape[1], ratio)
        masked = torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter_(1, order[:, :k], True)
        return Draw(Mask.from_bool(masked), order)

    def losses(self, scores: AgentOutput, draw: Draw, patch_loss: torch.Tensor) -> AgentLosses:
        """Actor and critic losses from the reconstruction losses the draw produced.

        Args:
            scores: the agent's output the draw was made from.
            draw: the draw.
            patch_loss: ``[B, N]`` per-patch reconstruction loss (detached here: the rewards).

        Returns:
            critic: MSE between predicted and observed loss on the masked patches;
            actor: ``-mean_j(log pi_j(i_j) * A_j) - beta * H(pi)``, ``A_j = r_j - V_j`` (module docstring).
        """
        k = draw.mask.ids_masked.shape[1]
        drawn = draw.order[:, :k]  # [B, M] masked patches in draw order
        reward = torch.gather(patch_loss.detach().float(), 1, drawn)  # [B, M]
        critic = F.mse_loss(torch.gather(scores.values, 1, drawn), reward)
        log_prob, baseline = plackett_luce(scores.logits, scores.values, draw.order, k)  # [B, M] each
        log_pi = torch.log_softmax(scores.logits.float(), dim=1)  # [B, N]
        entropy = -(log_pi.exp() * log_pi).sum(1).mean()
        actor = -(log_prob * (reward - baseline)).mean() - self.entropy_weight * entropy
        return AgentLosses(actor=actor, critic=critic, entropy=entropy.detach())
