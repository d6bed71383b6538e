"""Synthetic lesion phantoms in 2D and 3D, with known lesion masks and per-site styles.

A phantom is an ellipsoidal "organ" that fills the view (at most dim corners outside it),
with smooth low-frequency texture, and a few small lesions inside it that are brighter and
carry a high-frequency texture. A
:class:`SiteStyle` then changes intensities the way scanners of different hospitals do.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amlp_core.atomic import atomic_write_text
from amlp_core.data.dataset import Sample
from amlp_core.data.io import write_nifti
from amlp_core.data.transforms import normalize_intensity
from amlp_core.errors import ConfigError

logger = logging.getLogger(__name__)

# Lesion radius as a fraction of the smallest side; larger in 3D so that lesions cover
# roughly 2-8 % of the image in both cases.
DEFAULT_LESION_RADIUS = {2: (0.05, 0.09), 3: (0.11, 0.18)}


@dataclass(frozen=True)
class SiteStyle:
    """Intensities of one site: ``scale * (contrast(image) * bias_field + noise) + offset``."""

    scale: float = 1.0
    offset: float = 0.0
    contrast: float = 1.0
    noise_std: float = 0.05
    bias: float = 0.0  # amplitude of the smooth multiplicative bias field (0 = none)


def site_style(site: int) -> SiteStyle:
    """Deterministic style of site ``site``: site 0 is neutral, the others differ from it."""
    if site < 0:
        raise ConfigError(f"site must be >= 0, got {site}")
    if site == 0:
        return SiteStyle()
    rng = np.random.default_rng((7919, site))
    low, high = (0.5, -0.5, 0.6, 0.02, 0.1), (2.0, 0.5, 1.5, 0.12, 0.4)  # in SiteStyle field order
    return SiteStyle(*(round(float(v), 3) for v in rng.uniform(low, high)))


def smooth_noise(shape: Sequence[int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (FFT, periodic), rescaled to zero mean and unit std.

    Returns:
        float32 ``[*shape]``; ``sigma`` is the filter width in voxels.
    """
    noise = rng.standard_normal(tuple(shape))
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * sum(f**2 for f in freqs))
    field = np.fft.ifftn(np.fft.fftn(noise) * transfer).real
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def _ellipsoid(grid: np.ndarray, center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised distance ``[*shape]`` of every voxel to ``center`` (1 on the surface)."""
    per_axis = (-1,) + (1,) * (grid.ndim - 1)
    return np.sqrt((((grid - center.reshape(per_axis)) / radii.reshape(per_axis)) ** 2).sum(axis=0))


def _lesion_mask(
    grid: np.ndarray, organ_rho: np.ndarray, rng: np.random.Generator, n_lesions: tuple, radius: tuple
) -> np.ndarray:
    """bool ``[*shape]``: a few ellipsoidal blobs centred in the inner part of the organ.

    ``grid`` ``[D, *shape]`` holds voxel coordinates, ``organ_rho`` ``[*shape]`` the organ distance.
    """
    shape = grid.shape[1:]
    inner = np.flatnonzero(organ_rho <= 0.5)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(n_lesions[0], n_lesions[1] + 1))):
        center = grid.reshape(len(shape), -1)[:, rng.choice(inner)]
        radii = rng.uniform(*radius) * min(shape) * rng.uniform(0.8, 1.25, size=len(shape))
        mask |= _ellipsoid(grid, center, np.maximum(radii, 1.0)) <= 1
    return mask & (organ_rho <= 1)


def _apply_style(image: np.ndarray, style: SiteStyle, rng: np.random.Generator) -> np.ndarray:
    mean = image.mean()
    image = mean + style.contrast * (image - mean)
    if style.bias:
        field = smooth_noise(image.shape, rng, sigma=min(image.shape) / 3)
        image = image * (1 + style.bias * field / np.abs(field).max())
    image = image + style.noise_std * rng.standard_normal(image.shape)
    return (style.scale * image + style.offset).astype(np.float32)


def make_phantom(
    shape: Sequence[int],
    rng: np.random.Generator,
    style: SiteStyle = SiteStyle(),
    n_lesions: tuple[int, int] = (2, 4),
    lesion_radius: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image with lesions.

    Args:
        shape: spatial shape, 2 or 3 sizes of at least 8.
        rng: source of all randomness (same state -> same phantom).
        style: site appearance.
        n_lesions: inclusive range of the number of lesions.
        lesion_radius: radius range as a fraction of the smallest side
            (default :data:`DEFAULT_LESION_RADIUS` for the number of dims).

    Returns:
        ``(image float32 [*shape], lesion_mask uint8 [*shape])`` with 1 = lesion.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 8:
        raise ConfigError(f"phantom shape must be 2 or 3 sizes >= 8, got {shape}")
    radius = lesion_radius or DEFAULT_LESION_RADIUS[len(shape)]
    sides = np.array(shape, dtype=np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    organ_center = (sides - 1) / 2 + rng.uniform(-0.05, 0.05, size=len(shape)) * sides
    organ_rho = _ellipsoid(grid, organ_center, rng.uniform(0.8, 0.95, size=len(shape)) * sides)  # fills the view
    lesions = _lesion_mask(grid, organ_rho, rng, n_lesions, radius)

    image = 0.1 + 0.02 * smooth_noise(shape, rng, sigma=2.0)
    organ_texture = 0.45 + 0.08 * smooth_noise(shape, rng, sigma=min(shape) / 8)
    lesion_texture = 0.8 + 0.12 * smooth_noise(shape, rng, sigma=0.6)
    image = np.where(organ_rho <= 1, organ_texture, image)
    image = np.where(lesions, lesion_texture, image)
    return _apply_style(image, style, rng), lesions.astype(np.uint8)


def _phantoms(n: int, shape: Sequence[int], seed: int, site: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, raw image [*shape], lesion mask [*shape])`` for ``n`` phantoms of one site."""
    style, rng = site_style(site), np.random.default_rng((seed, site))
    for i in range(n):
        image, mask = make_phantom(shape, rng, style)
        yield f"phantom_s{site}_{i:04d}", image, mask


def make_phantom_samples(n: int, shape: Sequence[int], seed: int, site: int = 0) -> list[Sample]:
    """``n`` normalised phantom samples: image float32 ``[1, *shape]``, label int64 ``[*shape]``."""
    return [
        Sample(name, normalize_intensity(image[None]), mask.astype(np.int64), np.eye(4))
        for name, image, mask in _phantoms(n, shape, seed, site)
    ]


def write_phantom_dataset(out_dir: str | os.PathLike, n: int, shape: Sequence[int], seed: int, site: int = 0) -> Path:
    """Write ``n`` phantoms as an MSD-layout folder (dataset.json, imagesTr/, labelsTr/).

    Images keep their raw site intensities; loading them with
    :func:`~amlp_core.data.dataset.load_samples` gives the same samples as
    :func:`make_phantom_samples`. Returns ``out_dir``.
    """
    out = Path(out_dir)
    training = []
    for name, image, mask in _phantoms(n, shape, seed, site):
        write_nifti(image, np.eye(4), out / "imagesTr" / f"{name}.nii.gz")
        write_nifti(mask, np.eye(4), out / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {
        "name": f"phantom_site{site}", "description": f"Synthetic lesion phantoms, site {site}, seed {seed}",
        "tensorImageSize": f"{len(shape)}D", "modality": {"0": "MRI"},  # MR-like
        "labels": {"0": "background", "1": "lesion"}, "numTraining": n, "numTest": 0, "training": training,
    }  # fmt: skip
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=1))
    logger.info("wrote %d phantoms of site %d to %s", n, site, out)
    return out
