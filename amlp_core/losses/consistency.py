"""CCL, the category consistency loss (docs/methods.md).

Two categorisations of the masked patches must agree: the cluster one (soft assignment
to the lesion centroid) and the difficulty one (loss above the image's median).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lesion_assignment(
    feats: torch.Tensor, centroids: torch.Tensor, lesion: int, temperature: float = 1.0
) -> torch.Tensor:
    """Soft assignment of each patch to the lesion centroid.

    ``q_i = softmax_k(-||e_i - c_k||^2 / (F * T))[lesion]``; the squared distance is divided by
    the feature size F so that T does not depend on it.

    Args:
        feats: ``[B, M, F]`` standardised features, with gradient.
        centroids: ``[B, K, F]`` the batch's k-means centroids (detached here).
        lesion: index of the lesion centroid.

    Returns:
        ``[B, M]`` probabilities.
    """
    c = centroids.detach()
    sq = (feats.unsqueeze(2) - c.unsqueeze(1)).pow(2).mean(-1)  # [B, M, K]
    return torch.softmax(-sq / temperature, dim=-1)[..., lesion]


def hard_targets(l_masked: torch.Tensor) -> torch.Tensor:
    """``h_i = 1`` where ``l_i`` is above the image's median over M: ``[B, M]`` -> ``[B, M]`` float."""
    losses = l_masked.detach()
    return (losses > losses.median(dim=1, keepdim=True).values).float()


def category_consistency_loss(
    feats: torch.Tensor, centroids: torch.Tensor, lesion: int, l_masked: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``BCE(q_i, h_i)`` over the masked patches. Shapes as :func:`lesion_assignment`; returns a scalar."""
    q = lesion_assignment(feats, centroids, lesion, temperature).clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(q.float(), hard_targets(l_masked))
