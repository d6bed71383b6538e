"""Batched k-means in PyTorch: one clustering per image, all images of a batch at once."""

from __future__ import annotations

import torch


def _sq_dist(x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N, F]``, ``[B, K, F]`` -> squared distances ``[B, N, K]`` (``x_sq``: cached ``|x|^2`` ``[B, N, 1]``)."""
    if x_sq is None:
        x_sq = x.pow(2).sum(-1, keepdim=True)
    return (x_sq - 2 * x @ c.transpose(1, 2) + c.pow(2).sum(-1).unsqueeze(1)).clamp_min(0)


def _kmeanspp_init(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding, batched: ``[B, N, F]`` -> initial centroids ``[B, K, F]``."""
    b, n, f = x.shape
    rows = torch.arange(b, device=x.device)
    first = torch.randint(n, (b,), generator=generator, device=x.device)
    centroids = [x[rows, first]]  # list of [B, F]
    closest = _sq_dist(x, centroids[0].unsqueeze(1)).squeeze(-1)  # [B, N]
    for _ in range(1, k):
        weights = closest + 1e-12
        pick = torch.multinomial(weights / weights.sum(1, keepdim=True), 1, generator=generator).squeeze(1)
        centroids.append(x[rows, pick])
        closest = torch.minimum(closest, _sq_dist(x, centroids[-1].unsqueeze(1)).squeeze(-1))
    return torch.stack(centroids, dim=1)


@torch.no_grad()
def batched_kmeans(
    x: torch.Tensor, k: int, iters: int = 10, inits: int = 3, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding, run independently on every item of a batch.

    The ``inits`` restarts run in parallel; each item keeps the restart of lowest inertia
    (as scikit-learn's ``n_init``). Iteration stops early once no assignment changes.

    Args:
        x: ``[B, N, F]`` points (N points of F features per item).
        k: number of clusters.
        iters: Lloyd iterations.
        inits: independent k-means++ restarts.
        generator: random generator of the seeding (seeded runs repeat exactly).

    Returns:
        ``(labels [B, N] int64, centroids [B, K, F])``.
    """
    b, n, f = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (number of points), got {k}")
    xr = x.float().repeat_interleave(inits, dim=0)  # [B*I, N, F]
    x_sq = xr.pow(2).sum(-1, keepdim=True)  # [B*I, N, 1]
    centroids = _kmeanspp_init(xr, k, generator)  # [B*I, K, F]
    labels = None
    for _ in range(iters):
        previous, labels = labels, _sq_dist(xr, centroids, x_sq).argmin(-1)  # [B*I, N]
        if previous is not None and torch.equal(previous, labels):
            break  # converged everywhere: further iterations change nothing
        onehot = torch.nn.functional.one_hot(labels, k).to(xr.dtype)  # [B*I, N, K]
        counts = onehot.sum(1)  # [B*I, K]
        sums = onehot.transpose(1, 2) @ xr  # [B*I, K, F]
        # An emptied cluster keeps its previous centroid.
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centroids)
    dist = _sq_dist(xr, centroids, x_sq)  # [B*I, N, K]
    labels = dist.argmin(-1)
    inertia = dist.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(-1).view(b, inits)  # [B, I]
    best = inertia.argmin(1) + torch.arange(b, device=x.device) * inits  # [B]
    return labels[best], centroids[best]
