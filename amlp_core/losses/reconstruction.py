"""Reconstruction losses of masked image modelling (docs/methods.md).

``l_i`` is the mean squared error of patch i's prediction against its per-patch
normalised pixels; M is the set of masked patches of one image.
"""

from __future__ import annotations

import torch


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch zero mean, unit variance: ``[B, N, P]`` -> ``[B, N, P]``."""
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def patch_losses(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-patch MSE ``l_i``: ``[B, N, P]``, ``[B, N, P]`` -> ``[B, N]``."""
    return (pred.float() - target.float()).pow(2).mean(-1)


def masked_losses(per_patch: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
    """The masked patches' losses: ``[B, N]``, ``[B, M]`` -> ``[B, M]``."""
    return torch.gather(per_patch, 1, ids_masked)


def plain_reconstruction_loss(l_masked: torch.Tensor) -> torch.Tensor:
    """MAE loss: mean of ``l_i`` over M (and the batch). ``[B, M]`` -> scalar."""
    return l_masked.mean()


def relative_weights(l_masked: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """ARL/RRL weights ``w_i = |M| softmax_i(l_i / (tau * mean_M l))``, detached. ``[B, M]`` -> ``[B, M]``.

    The weights average to 1 over each image's masked patches; harder patches weigh more.
    """
    losses = l_masked.detach().float()
    normalised = losses / losses.mean(dim=1, keepdim=True).clamp_min(1e-12)
    return losses.shape[1] * torch.softmax(normalised / tau, dim=1)


def relative_reconstruction_loss(l_masked: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """ARL/RRL: ``mean_M(w_i * l_i)`` with :func:`relative_weights`. ``[B, M]`` -> scalar."""
    return (relative_weights(l_masked, tau) * l_masked).mean()
