"""Array transforms on channel-first images ``[C, *spatial]`` and label maps ``[*spatial]``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import AdjustContrast
from monai.transforms.utils import create_rotate, create_scale
from monai.utils import convert_to_numpy

from amlp_core.config.schema import AUGMENTATIONS
from amlp_core.errors import ConfigError

__all__ = ["AUGMENTATIONS"]  # (defined with the config's other closed sets)


def normalize_intensity(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score over the whole image.

    Args:
        image: ``[C, *spatial]``.

    Returns:
        float32 ``[C, *spatial]`` with zero mean and unit std per channel; a constant
        channel becomes zeros.
    """
    image = np.asarray(image, dtype=np.float32)
    axes = tuple(range(1, image.ndim))
    mean = image.mean(axis=axes, keepdims=True)
    std = image.std(axis=axes, keepdims=True)
    return ((image - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def _pad_to(image: np.ndarray, label: np.ndarray | None, roi_size: Sequence[int]):
    """Pad symmetrically so every spatial side is at least ``roi_size``."""
    pads = []
    for size, roi in zip(image.shape[1:], roi_size):
        missing = max(0, roi - size)
        pads.append((missing // 2, missing - missing // 2))
    if not any(before or after for before, after in pads):
        return image, label
    image = np.stack([np.pad(channel, pads, constant_values=channel.min()) for channel in image])
    if label is not None:
        label = np.pad(label, pads, constant_values=0)
    return image, label


def fit_to_roi(
    image: np.ndarray,
    label: np.ndarray | None,
    roi_size: Sequence[int],
    rng: np.random.Generator | None = None,
    foreground_share: float = 0.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pad (image with its per-channel minimum, label with 0), then crop to ``roi_size``.

    Args:
        image: ``[C, *spatial]``.
        label: ``[*spatial]`` or None.
        roi_size: one size per spatial axis.
        rng: random crop position when given, else a center crop.
        foreground_share: with ``rng``, an image larger than ``roi_size`` is cropped around a random
            foreground voxel of ``label`` with this probability (nnU-Net's oversampling), else at random.
            An image that fits draws nothing more from ``rng``.

    Returns:
        ``(image [C, *roi_size], label [*roi_size] or None)``.
    """
    if len(roi_size) != image.ndim - 1:
        raise ConfigError(f"roi_size {tuple(roi_size)} does not fit image of spatial shape {image.shape[1:]}")
    image, label = _pad_to(image, label, roi_size)
    sizes = image.shape[1:]
    larger = any(size > roi for size, roi in zip(sizes, roi_size))
    if rng is not None and larger and label is not None and foreground_share > 0 and rng.random() < foreground_share:
        foreground = np.argwhere(label > 0)
        if len(foreground):
            centre = foreground[rng.integers(len(foreground))]
            starts = [int(np.clip(c - roi // 2, 0, size - roi)) for c, size, roi in zip(centre, sizes, roi_size)]
            return _crop(image, label, starts, roi_size)
    starts = [
        int(rng.integers(0, size - roi + 1)) if rng is not None else (size - roi) // 2
        for size, roi in zip(sizes, roi_size)
    ]
    return _crop(image, label, starts, roi_size)


def _crop(image: np.ndarray, label: np.ndarray | None, starts: Sequence[int], roi_size: Sequence[int]):
    window = tuple(slice(start, start + roi) for start, roi in zip(starts, roi_size))
    image = np.ascontiguousarray(image[(slice(None), *window)])
    label = np.ascontiguousarray(label[window]) if label is not None else None
    return image, label


def random_flip(
    image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Flip each spatial axis with probability 0.5.

    Args:
        image: ``[C, *spatial]``.
        label: ``[*spatial]`` or None.

    Returns:
        Contiguous copies with the same shapes.
    """
    for axis in range(image.ndim - 1):
        if rng.random() < 0.5:
            image = np.flip(image, axis + 1)
            label = np.flip(label, axis) if label is not None else None
    return image.copy(), (label.copy() if label is not None else None)


# Per-sample probabilities and ranges of strong_augment (nnU-Net's defaults, rotation narrowed to +-15 deg).
P_ROTATE, MAX_ROTATE_DEG = 0.2, 15.0
P_SCALE, SCALE_RANGE = 0.2, (0.85, 1.25)  # > 1 zooms out (objects shrink), as in nnU-Net
P_NOISE, MAX_NOISE_STD = 0.1, 0.1  # images are z-scored
P_BRIGHTNESS, BRIGHTNESS_RANGE = 0.15, (0.75, 1.25)
P_CONTRAST, CONTRAST_RANGE = 0.15, (0.75, 1.25)
P_GAMMA, GAMMA_RANGE = 0.3, (0.7, 1.5)


def strong_augment(
    image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """nnU-Net-style augmentation of one (cropped) sample; every random draw comes from ``rng``.

    In order, each with its own probability: rotation (about every axis in 3D, in-plane in 2D)
    and scaling, done as one affine resample about the centre (image bi/trilinear and padded with
    each channel's minimum, label nearest and padded with 0); Gaussian noise; brightness (a
    multiplicative factor); contrast (around each channel's mean, clipped to its range); gamma
    (on each channel rescaled to [0, 1] and back, its mean and std kept).

    Args:
        image: float32 ``[C, *spatial]``, 2 or 3 spatial dims.
        label: integer ``[*spatial]`` or None.
        rng: the sample's generator.

    Returns:
        ``(image float32 [C, *spatial], label [*spatial] or None)``, contiguous, same shapes and
        label dtype; label values are a subset of the input's.
    """
    spatial = image.ndim - 1
    rotate, scale = rng.random() < P_ROTATE, rng.random() < P_SCALE
    if rotate or scale:
        n_angles = 3 if spatial == 3 else 1
        angles = rng.uniform(-MAX_ROTATE_DEG, MAX_ROTATE_DEG, n_angles) if rotate else np.zeros(n_angles)
        factor = _around_one(rng, *SCALE_RANGE) if scale else 1.0
        image, label = _rotate_scale(image, label, np.deg2rad(angles), factor)
    if rng.random() < P_NOISE:
        image = image + rng.normal(0.0, rng.uniform(0.0, MAX_NOISE_STD), image.shape).astype(np.float32)
    if rng.random() < P_BRIGHTNESS:
        image = image * np.float32(rng.uniform(*BRIGHTNESS_RANGE))
    if rng.random() < P_CONTRAST:
        contrast = np.float32(_around_one(rng, *CONTRAST_RANGE))
        axes = tuple(range(1, image.ndim))
        mean = image.mean(axis=axes, keepdims=True)
        image = np.clip(
            (image - mean) * contrast + mean, image.min(axis=axes, keepdims=True), image.max(axis=axes, keepdims=True)
        )
    if rng.random() < P_GAMMA:
        gamma = AdjustContrast(_around_one(rng, *GAMMA_RANGE), retain_stats=True)
        image = np.stack([convert_to_numpy(gamma(channel)) for channel in image])
    return np.ascontiguousarray(image, dtype=np.float32), label


def _rotate_scale(image: np.ndarray, label: np.ndarray | None, radians: np.ndarray, factor: float):
    """One affine resample about the centre, the same grid for image (bi/trilinear) and label (nearest).

    The matrix is MONAI's (``create_rotate @ create_scale``, voxel coordinates, output to input, as
    ``monai.transforms.Affine`` builds it); the resampling is done here with one ``affine_grid``
    shared by image and label, which is several times faster than two ``Affine`` calls.
    """
    shape = image.shape[1:]
    n = len(shape)
    matrix = create_rotate(n, list(radians) if n == 3 else float(radians[0])) @ create_scale(n, [factor] * n)
    # torch's grid runs over the axes in reverse order, normalised to [-1, 1] along each side.
    half = np.array(shape[::-1], dtype=np.float64) / 2
    theta = torch.zeros(1, n, n + 1)
    theta[0, :, :n] = torch.from_numpy(matrix[:n, :n][::-1, ::-1] * half[None, :] / half[:, None])
    grid = F.affine_grid(theta, [1, 1, *shape], align_corners=False)

    def resample(array: np.ndarray, mode: str) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
        return F.grid_sample(tensor, grid, mode=mode, padding_mode="zeros", align_corners=False)[0].numpy()

    low = image.min(axis=tuple(range(1, image.ndim)), keepdims=True)  # pad with each channel's minimum
    image = resample(image - low, "bilinear") + low
    if label is not None:
        label = np.rint(resample(label[None], "nearest")[0]).astype(label.dtype)
    return image, label


def _around_one(rng: np.random.Generator, low: float, high: float) -> float:
    """A factor below 1 or above 1 with even odds, uniform within that side (as nnU-Net draws)."""
    return float(rng.uniform(low, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, high))
