"""Array transforms on channel-first images ``[C, *spatial]`` and label maps ``[*spatial]``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amlp_core.errors import ConfigError


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
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pad (image with its per-channel minimum, label with 0), then crop to ``roi_size``.

    Args:
        image: ``[C, *spatial]``.
        label: ``[*spatial]`` or None.
        roi_size: one size per spatial axis.
        rng: random crop position when given, else a center crop.

    Returns:
        ``(image [C, *roi_size], label [*roi_size] or None)``.
    """
    if len(roi_size) != image.ndim - 1:
        raise ConfigError(f"roi_size {tuple(roi_size)} does not fit image of spatial shape {image.shape[1:]}")
    image, label = _pad_to(image, label, roi_size)
    starts = [
        int(rng.integers(0, size - roi + 1)) if rng is not None else (size - roi) // 2
        for size, roi in zip(image.shape[1:], roi_size)
    ]
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
