"""Masking policies. A policy returns a :class:`Mask`; it never runs inside a model's forward."""

from amlp_core.masking.base import Mask, num_masked, random_mask
from amlp_core.masking.kmeans import batched_kmeans
from amlp_core.masking.mps import (
    Clustering,
    FeatureScale,
    MPSMasking,
    cluster_patches,
    patch_features,
    patch_stats,
    random_projection,
)

__all__ = [
    "Clustering",
    "FeatureScale",
    "MPSMasking",
    "Mask",
    "batched_kmeans",
    "cluster_patches",
    "num_masked",
    "patch_features",
    "patch_stats",
    "random_mask",
    "random_projection",
]
