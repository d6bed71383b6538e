"""Near-duplicate images within one site's data: the same lesion captured twice, or one image saved twice.

A split that puts two near-duplicates on both sides measures memory, not segmentation (BUSI holds about
230 near-duplicate images in about 100 groups, Pawlowska et al. 2023). Each image is reduced to a small
thumbnail (the channel mean, box-averaged to ``16 x 16``, mean removed, unit length); two images whose
thumbnails correlate above a threshold are near-duplicates, and near-duplicates of near-duplicates form
one group (union-find). Cheap: one read of every image and one matrix product, in row blocks.

On BUSI's 621 images a correlation of 0.95 finds 104 groups of 237 images, in line with the published
count; every pair between 0.93 and 0.975 that was looked at showed the same lesion (docs/data.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from amlp_core.data.cases import DatasetIndex, read_case_image
from amlp_core.errors import DataError

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 16
_BLOCK = 1024  # rows of the correlation matrix computed at once


def thumbnail(image: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """The unit-length, zero-mean thumbnail of one image.

    Args:
        image: ``[C, *S]`` (2D or 3D).
        side: thumbnail side per spatial axis.

    Returns:
        float32 ``[side ** dims]``; zeros for a constant image (it correlates with nothing).
    """
    x = torch.as_tensor(np.asarray(image, dtype=np.float32).mean(0))[None, None]  # [1, 1, *S]
    pool = F.adaptive_avg_pool2d if x.ndim == 4 else F.adaptive_avg_pool3d
    t = pool(x, side).flatten().double()  # [side ** dims]
    t = t - t.mean()
    norm = float(t.norm())
    return (t / norm if norm > 1e-12 else torch.zeros_like(t)).float().numpy()


def duplicate_groups(names: Sequence[str], thumbnails: np.ndarray, threshold: float) -> list[list[str]]:
    """Groups of near-duplicates among ``names``.

    Args:
        names: one per row of ``thumbnails``.
        thumbnails: ``[N, D]`` unit vectors (:func:`thumbnail`).
        threshold: two images whose thumbnails correlate above it are near-duplicates.

    Returns:
        Groups of at least two names, each sorted, sorted by their first name.
    """
    if len(names) != len(thumbnails):
        raise ValueError(f"{len(names)} names for {len(thumbnails)} thumbnails")
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    t = np.asarray(thumbnails, dtype=np.float32)
    for start in range(0, len(t), _BLOCK):
        block = t[start : start + _BLOCK] @ t.T  # [b, N] correlations
        rows, cols = np.nonzero(block > threshold)
        for a, b in zip((rows + start).tolist(), cols.tolist()):
            if a < b:
                parent[root(a)] = root(b)
    members: dict[int, list[str]] = {}
    for k, name in enumerate(names):
        members.setdefault(root(k), []).append(name)
    return sorted((sorted(g) for g in members.values() if len(g) > 1), key=lambda g: g[0])


def find_near_duplicates(index: DatasetIndex, threshold: float, max_voxels: int | None = None) -> list[list[str]]:
    """:func:`duplicate_groups` of the images of ``index``; an image that cannot be read is left out (it is
    a problem of its own, reported by the checks).

    Returns:
        Groups of at least two case names, as :func:`duplicate_groups`.
    """
    kept, thumbs = [], []
    for case in tqdm(index.cases, desc="Near-duplicates", unit="case", leave=False, disable=None):
        try:
            image, _ = read_case_image(case, max_voxels)
        except DataError:
            continue
        kept.append(case.name)
        thumbs.append(thumbnail(image))
    if not kept:
        return []
    groups = duplicate_groups(kept, np.stack(thumbs), threshold)
    logger.info(
        "%s: %d near-duplicate groups of %d images (correlation > %g)",
        index.root,
        len(groups),
        sum(map(len, groups)),
        threshold,
    )
    return groups


def group_names(groups: Iterable[Sequence[str]]) -> dict[str, str]:
    """``{case name: its group's name}`` (the group's first name) for every case in a group."""
    return {name: group[0] for group in groups for name in group}
