"""Masks as data: which patches an image shows to the encoder and which it hides."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def num_masked(num_patches: int, ratio: float) -> int:
    """Patches to mask at ``ratio``: at least one, and at least one left visible."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"masking ratio must be in (0, 1), got {ratio}")
    return min(max(int(round(ratio * num_patches)), 1), num_patches - 1)


@dataclass(frozen=True)
class Mask:
    """A per-image patch mask with the same number of masked patches in every image.

    Attributes:
        masked: ``[B, N]`` bool, True where the patch is hidden.
        ids_keep: ``[B, N_keep]`` indices of the visible patches (ascending).
        ids_masked: ``[B, N_mask]`` indices of the hidden patches (ascending).
        ids_restore: ``[B, N]`` position of each patch in ``cat(ids_keep, ids_masked)``.
    """

    masked: torch.Tensor
    ids_keep: torch.Tensor
    ids_masked: torch.Tensor
    ids_restore: torch.Tensor

    @classmethod
    def from_bool(cls, masked: torch.Tensor) -> Mask:
        """Build from a ``[B, N]`` boolean mask with the same count of True per row."""
        counts = masked.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"every image must mask the same number of patches, got counts {counts.tolist()}")
        n_mask = int(counts[0])
        ids_shuffle = torch.argsort(masked.to(torch.int8), dim=1, stable=True)  # visible first, then masked
        n_keep = masked.shape[1] - n_mask
        return cls(
            masked=masked,
            ids_keep=ids_shuffle[:, :n_keep],
            ids_masked=ids_shuffle[:, n_keep:],
            ids_restore=torch.argsort(ids_shuffle, dim=1),
        )

    @property
    def ratio(self) -> float:
        return self.ids_masked.shape[1] / self.masked.shape[1]


def random_mask(
    batch: int,
    num_patches: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Mask:
    """Uniformly random mask: ``round(ratio * N)`` patches per image."""
    n_mask = num_masked(num_patches, ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    return Mask.from_bool(_lowest(noise, n_mask))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, N]`` bool with True at the ``k`` lowest scores of each row."""
    order = torch.argsort(scores, dim=1)
    masked = torch.zeros_like(scores, dtype=torch.bool)
    masked.scatter_(1, order[:, :k], True)
    return masked
