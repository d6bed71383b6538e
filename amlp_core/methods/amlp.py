"""MPS-AMS and AMLP: lesion-first masking by clustering, with the AMR ratio schedule.

- ``mps_ams``: MPS + AMR with the plain reconstruction loss.
- ``amlp``: MPS + AMR + ARL/RRL + ``ccl_weight`` * CCL.
"""

from __future__ import annotations

import torch

from amlp_core.config import MethodConfig, ModelConfig
from amlp_core.losses import category_consistency_loss, plain_reconstruction_loss, relative_reconstruction_loss
from amlp_core.masking import MPSMasking
from amlp_core.masking.base import Mask
from amlp_core.masking.mps import Clustering
from amlp_core.methods.base import PretrainMethod, StepOutput, register_method


@register_method("mps_ams")
class MPSAMS(PretrainMethod):
    """MPS-AMS: Masked Patch Selection (k-means on the stem's patch features, the likely-lesion group
    masked first, then random patches) at the AMR ratio of the progress; plain reconstruction loss.

    A step on ``images [B, C, *S]`` returns the loss, the metrics and the mask on the patch grid.

    Reference: Wang et al., "MPS-AMS: Masked Patches Selection and Adaptive Masking Strategy Based
    Self-Supervised Medical Image Segmentation", ICASSP 2023 (arXiv:2302.13699). Where we depart from it:
    docs/methods.md, "MPS".
    """

    uses_amr = True
    #: Whether a loss reaches the MPS features (CCL does): otherwise the stem runs without gradient.
    feature_gradient: bool = False

    def __init__(self, model_cfg: ModelConfig, method_cfg: MethodConfig, private: bool = False) -> None:
        super().__init__(model_cfg, method_cfg, private)
        m = method_cfg
        self.mps = MPSMasking(
            m.mps_clusters,
            m.mps_random_fraction,
            m.mps_momentum,
            m.kmeans_iters,
            m.kmeans_inits,
            margin=m.mps_margin,
            embed_dim=model_cfg.embed_dim if m.mps_features == "tokens" else model_cfg.conv_channels[0],
            proj_dim=m.mps_proj_dim,
            embed_weight=m.mps_embed_weight,
        )

    def training_step(
        self, images: torch.Tensor, progress: float, generator: torch.Generator | None = None
    ) -> StepOutput:
        ratio = self.masking_ratio(progress)
        first = self.encoder.first_conv(images)  # [B, c_1, *S/2], shared with the masked pass
        with torch.set_grad_enabled(self.feature_gradient and torch.is_grad_enabled()):
            description = self.describe_patches(images, first if self.feature_gradient else first.detach())
        feats = self.mps.features(description, images, self.model_cfg.patch_size)  # [B, N, c + 2], grad for CCL
        clustering = self.mps.cluster(feats.detach(), generator)  # per-image groups, by size rank
        lesion = self.mps.lesion_rank
        mask = self.mps.select(clustering, ratio, generator)  # lesion group first
        per_patch = self.reconstruct(images, mask, first)  # [B, N], hidden patches zeroed at every scale
        l_masked = self.masked(per_patch, mask)  # [B, M]
        rec = self.reconstruction_loss(l_masked)
        extra, metrics = self.extra_loss(feats, clustering, lesion, mask, l_masked)
        if not self.private:  # under DP the lesion group stays the spec's prior (the smallest)
            self.mps.update(clustering, mask, per_patch)
        loss = rec + extra
        metrics.update(loss=loss.item(), rec=rec.item(), ratio=mask.ratio, lesion_rank=float(lesion))
        return StepOutput(loss, metrics, mask)

    def describe_patches(self, images: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """What MPS clusters the patches of ``images`` ``[B, C, *S]`` by (``method.mps_features``): the
        encoder's stem on the whole image ``[B, c_1, *S/2]`` (``embed``), or its tokens on the whole,
        unmasked image ``[B, N, D]`` (``tokens``: context from every patch, at a second forward pass).
        ``first``: the first conv of the images (:meth:`~amlp_core.models.HybridEncoder.first_conv`)."""
        if self.method_cfg.mps_features == "tokens":
            return self.encoder(images, first=first).tokens  # [B, N, D]
        return self.encoder.stem(first)  # [B, c_1, *S/2]

    def reconstruction_loss(self, l_masked: torch.Tensor) -> torch.Tensor:
        return plain_reconstruction_loss(l_masked)

    def extra_loss(
        self, feats: torch.Tensor, clustering: Clustering, lesion: int, mask: Mask, l_masked: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """A loss beside the reconstruction (none here; AMLP's CCL) and its figures.

        Args:
            feats: ``[B, N, F]`` the patches' MPS features (with gradient where the method lets it through).
            clustering: the step's per-image patch groups (:class:`~amlp_core.masking.mps.Clustering`).
            lesion: the size rank of the lesion group.
            mask: the step's mask (``ids_masked`` ``[B, M]``).
            l_masked: ``[B, M]`` the masked patches' reconstruction losses.
        """
        return l_masked.new_zeros(()), {}


@register_method("amlp")
class AMLP(MPSAMS):
    """AMLP: MPS-AMS's masking, the relative reconstruction loss (ARL/RRL, ``method.arl_tau``) and
    ``method.ccl_weight`` x the category consistency loss on the masked patches' features, whose
    gradient reaches the encoder's stem.

    Reference: Wang et al., "AMLP: Adjustable Masking Lesion Patches for Self-Supervised Medical Image
    Segmentation", arXiv:2309.04312 (v1 2023 as "Adaptive ...", with ARL and the adaptive ratio; v2 2025 names
    them RRL and AMR). Where we depart from it: docs/methods.md.
    """

    feature_gradient = True

    def reconstruction_loss(self, l_masked: torch.Tensor) -> torch.Tensor:
        return relative_reconstruction_loss(l_masked, self.method_cfg.arl_tau)

    def extra_loss(
        self, feats: torch.Tensor, clustering: Clustering, lesion: int, mask: Mask, l_masked: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """CCL on the masked patches, with gradient through the encoder's stem."""
        m = self.method_cfg
        scaled = clustering.scale(feats)  # [B, N, F], standardised with detached statistics
        masked_feats = torch.gather(scaled, 1, mask.ids_masked.unsqueeze(-1).expand(-1, -1, scaled.shape[-1]))
        ccl = category_consistency_loss(masked_feats, clustering.centroids, lesion, l_masked, m.ccl_temperature)
        return m.ccl_weight * ccl, {"ccl": ccl.item()}
