"""MPS, Masked Patch Selection: cluster each image's patches and mask the likely lesions first.

docs/methods.md. Per image the N patches are described by a feature vector (the
encoder's stem, its first downsampling conv, averaged over each patch, joined with the patch's
intensity mean and standard deviation),
clustered into K groups by batched k-means, and the *lesion* group, the one whose patches
were hardest to reconstruct so far, is masked first.

Cluster indices from k-means are arbitrary, so groups are named by their size rank within
the image (rank 0 = smallest). The policy keeps a running mean of the reconstruction loss
per rank; the lesion rank is the one with the highest running loss, and the smallest group
until any loss is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from amlp_core.config import MethodConfig
from amlp_core.masking.base import Mask, _lowest, num_masked
from amlp_core.masking.kmeans import batched_kmeans


def patch_stats(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Intensity mean and standard deviation of every patch, by pooling (no patch copy).

    Args:
        images: ``[B, C, *S]`` images, ``S`` divisible by ``patch_size``.
        patch_size: patch side ``p``.

    Returns:
        ``[B, N, 2]`` in :func:`~amlp_core.models.patchify` order: mean and (unbiased) standard
        deviation over each patch's ``C * p**dims`` values.
    """
    pool = F.avg_pool2d if images.dim() == 4 else F.avg_pool3d
    x = images.float()
    mean = pool(x, patch_size).mean(1).flatten(1)  # [B, N]
    mean_sq = pool(x * x, patch_size).mean(1).flatten(1)  # [B, N]
    n = images.shape[1] * patch_size ** (images.dim() - 2)
    var = (mean_sq - mean * mean).clamp_min(0) * (n / max(n - 1, 1))
    return torch.stack([mean, var.sqrt()], dim=-1)


def pool_to_patches(feature_map: torch.Tensor, grid_size: tuple[int, ...]) -> torch.Tensor:
    """Average a feature map ``[B, c, *S_i]`` over each patch: ``[B, N, c]`` in patch order."""
    pool = F.avg_pool3d if feature_map.dim() == 5 else F.avg_pool2d
    factor = feature_map.shape[2] // grid_size[0]
    pooled = feature_map if factor == 1 else pool(feature_map, factor)  # [B, c, *G]
    return pooled.flatten(2).transpose(1, 2)


def patch_features(tokens: torch.Tensor, stats: torch.Tensor, projection: torch.Tensor | None = None) -> torch.Tensor:
    """Raw MPS features of every patch.

    Args:
        tokens: ``[B, N, D]`` the encoder's description of each patch (its stem, :func:`pool_to_patches`).
        stats: ``[B, N, 2]`` the patches' intensity mean and standard deviation (:func:`patch_stats`).
        projection: optional fixed ``[D, R]`` random projection of the embedding (R << D keeps
            distances nearly unchanged, Johnson-Lindenstrauss, and makes k-means cheaper).

    Returns:
        ``[B, N, R + 2]`` (``R = D`` without projection): embedding, intensity mean, standard deviation.
    """
    if projection is not None:
        tokens = tokens @ projection.to(tokens.dtype)  # [B, N, R]
    return torch.cat([tokens, stats.to(tokens.dtype)], dim=-1)


def random_projection(dim: int, rank: int, seed: int = 0) -> torch.Tensor:
    """A fixed Gaussian ``[dim, rank]`` projection, scaled to keep squared norms in expectation."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, rank, generator=g) / rank**0.5


@dataclass(frozen=True)
class FeatureScale:
    """Per-image standardisation of the feature columns, fitted without gradient.

    Each column gets zero mean and unit variance over the image's patches; the embedding
    block is then divided by sqrt(D), so that the embedding, the mean and the standard
    deviation weigh alike in the distances, and multiplied by ``embed_weight`` (0: the patches'
    intensity mean and spread alone).
    """

    mean: torch.Tensor  # [B, 1, F]
    scale: torch.Tensor  # [B, 1, F]

    @classmethod
    def fit(cls, feats: torch.Tensor, embed_weight: float = 1.0) -> FeatureScale:
        feats = feats.detach().float()
        d = feats.shape[-1] - 2
        block = torch.ones(feats.shape[-1], device=feats.device)
        block[:d] = d**0.5 / embed_weight if embed_weight > 0 else float("inf")
        std = feats.std(dim=1, keepdim=True).clamp_min(1e-6)
        return cls(mean=feats.mean(dim=1, keepdim=True), scale=std * block)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats.float() - self.mean) / self.scale


@dataclass(frozen=True)
class Clustering:
    """One image batch's clustering, with groups named by size rank.

    Attributes:
        rank: ``[B, N]`` size rank of each patch's group (0 = smallest group).
        centroids: ``[B, K, F]`` centroids in rank order (standardised feature space).
        scale: the standardisation the centroids live in.
    """

    rank: torch.Tensor
    centroids: torch.Tensor
    scale: FeatureScale


def cluster_patches(
    feats: torch.Tensor,
    k: int,
    iters: int,
    inits: int,
    generator: torch.Generator | None = None,
    embed_weight: float = 1.0,
) -> Clustering:
    """Cluster ``[B, N, F]`` raw features into ``k`` groups per image, groups ordered by size
    (``embed_weight``: of the embedding block against the intensity statistics, :class:`FeatureScale`)."""
    scale = FeatureScale.fit(feats, embed_weight)
    labels, centroids = batched_kmeans(scale(feats), k, iters=iters, inits=inits, generator=generator)
    sizes = torch.nn.functional.one_hot(labels, k).sum(1)  # [B, K]
    order = torch.argsort(sizes, dim=1, stable=True)  # order[b, r] = cluster of rank r
    rank_of = torch.argsort(order, dim=1)  # rank_of[b, cluster] = rank
    rank = torch.gather(rank_of, 1, labels)  # [B, N]
    centroids = torch.gather(centroids, 1, order.unsqueeze(-1).expand(-1, -1, centroids.shape[-1]))
    return Clustering(rank=rank, centroids=centroids, scale=scale)


_DEFAULTS = MethodConfig()  # the constructor's defaults are the config's: one source


class MPSMasking(nn.Module):
    """Lesion-first masking policy with a running per-group difficulty estimate.

    Args:
        clusters: K, groups per image.
        random_fraction: share of the masking budget always drawn uniformly at random.
        momentum: of the running mean of the per-group reconstruction loss.
        kmeans_iters, kmeans_inits: k-means settings.
        margin: relative loss lead a group needs over the smallest group to become the lesion group.
        embed_dim, proj_dim: project the ``embed_dim`` columns of the encoder's patch description to
            ``proj_dim`` with a fixed random matrix before clustering (0, or not fewer: no projection).
        embed_weight: weight of the encoder's description against the intensity mean and spread in
            the clustering (1: alike; 0: intensity alone).
    """

    def __init__(
        self,
        clusters: int = _DEFAULTS.mps_clusters,
        random_fraction: float = _DEFAULTS.mps_random_fraction,
        momentum: float = _DEFAULTS.mps_momentum,
        kmeans_iters: int = _DEFAULTS.kmeans_iters,
        kmeans_inits: int = _DEFAULTS.kmeans_inits,
        margin: float = _DEFAULTS.mps_margin,
        embed_dim: int = 0,
        proj_dim: int = 0,
        embed_weight: float = _DEFAULTS.mps_embed_weight,
    ) -> None:
        super().__init__()
        self.margin = margin
        self.embed_weight = embed_weight
        self.clusters = clusters
        self.random_fraction = random_fraction
        self.momentum = momentum
        self.kmeans_iters = kmeans_iters
        self.kmeans_inits = kmeans_inits
        # Running mean loss per size rank; NaN until observed. Saved with the method's state.
        self.register_buffer("group_loss", torch.full((clusters,), float("nan")))
        # Fixed, seeded, identical at every site: rebuilt from the seed, never saved.
        projection = random_projection(embed_dim, proj_dim) if proj_dim and embed_dim > proj_dim else None
        self.register_buffer("projection", projection, persistent=False)
        self.group_loss: torch.Tensor
        self.projection: torch.Tensor | None

    def features(self, description: torch.Tensor, images: torch.Tensor, patch_size: int) -> torch.Tensor:
        """MPS features ``[B, N, R + 2]`` of ``images`` ``[B, C, *S]``.

        Args:
            description: the encoder's view of the whole image (with gradient for CCL): its stem
                ``[B, c, *S / 2]``, averaged over each patch here, or its tokens ``[B, N, D]``, one per patch.
            images: the images, for the patches' intensity mean and standard deviation.
            patch_size: the patch side ``p``.
        """
        if description.dim() != 3:
            description = pool_to_patches(description, tuple(s // patch_size for s in images.shape[2:]))
        return patch_features(description, patch_stats(images, patch_size), self.projection)

    @property
    def lesion_rank(self) -> int:
        """The size rank taken as the lesion group.

        The smallest group (rank 0) until the running losses tell the groups apart: another
        group takes over only when its running loss exceeds the smallest group's by more than
        ``margin`` (relative), so that noise between near-equal losses does not flip the choice.
        """
        loss = self.group_loss
        if torch.isnan(loss).all():
            return 0
        hardest = int(torch.nan_to_num(loss, nan=-float("inf")).argmax())
        if torch.isnan(loss[0]) or loss[hardest] > (1 + self.margin) * loss[0]:
            return hardest
        return 0

    def cluster(self, feats: torch.Tensor, generator: torch.Generator | None = None) -> Clustering:
        return cluster_patches(feats, self.clusters, self.kmeans_iters, self.kmeans_inits, generator, self.embed_weight)

    def select(self, clustering: Clustering, ratio: float, generator: torch.Generator | None = None) -> Mask:
        """Mask ``round(ratio * N)`` patches per image, lesion group first.

        A share ``random_fraction`` of the budget is drawn uniformly among the patches not
        yet chosen; the rest goes to lesion-group patches in random order, then to random
        background patches when the lesion group is smaller than that.
        """
        rank = clustering.rank
        b, n = rank.shape
        budget = num_masked(n, ratio)
        n_random = int(round(self.random_fraction * budget))
        n_lesion_first = budget - n_random
        is_lesion = rank == self.lesion_rank
        priority = torch.rand(b, n, generator=generator, device=rank.device) + (~is_lesion).float()  # lesion < 1 <= bg
        masked = _lowest(priority, n_lesion_first)
        if n_random:
            rest = torch.rand(b, n, generator=generator, device=rank.device).masked_fill(masked, float("inf"))
            masked |= _lowest(rest, n_random)
        return Mask.from_bool(masked)

    @torch.no_grad()
    def update(self, clustering: Clustering, mask: Mask, patch_loss: torch.Tensor) -> None:
        """Fold this batch's per-patch losses ``[B, N]`` (masked patches only) into the group means."""
        loss = patch_loss.detach().float()
        for r in range(self.clusters):
            sel = mask.masked & (clustering.rank == r)
            if bool(sel.any()):
                value = loss[sel].mean()
                old = self.group_loss[r]
                self.group_loss[r] = value if torch.isnan(old) else self.momentum * old + (1 - self.momentum) * value
