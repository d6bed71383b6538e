"""TensorBoard event files: the run's (the server's aggregates) and each site's (its own scalars and pictures).

``tensorboard --logdir RUN_DIR/tensorboard`` shows the federation round by round: loss, masking ratio,
Dice per class overall and per site, the sites' outcomes, bytes, seconds, epsilon. A site's own folder
(``STATE/tensorboard``) adds its pictures, drawn from its own cases: where the round's mask falls on a
slice, over the lesion label, and the model's prediction over the label. Those pictures are written at
the site and never leave it; the server's events hold numbers the sites already report, nothing more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from amlp_core.data.io import overlay_pixels

log = logging.getLogger(__name__)
#: The folder of a run's (or a site's) event files.
BOARD_DIR = "tensorboard"


class Board:
    """One folder of TensorBoard event files, written as the run goes (flushed after every call)."""

    def __init__(self, folder: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # (imports tensorboard: only where a board is kept)

        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(self.folder), flush_secs=10)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Every finite number of ``values`` as ``prefix/key`` at ``step`` (text, flags and NaN are left out)."""
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self.writer.add_scalar(f"{prefix}/{key}", float(value), step)
        self.writer.flush()

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """An RGB uint8 picture ``[H, W, 3]``."""
        self.writer.add_image(tag, rgb, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _slice_index(image: np.ndarray, label: np.ndarray | None) -> int | None:
    """The slice along the last axis a 3D case ``[C, *S]`` is shown by: the label's largest cross-section, or
    the middle slice without one; None for a 2D image."""
    if image.ndim == 3:
        return None
    if label is not None and label.any():
        return int(np.argmax((label > 0).reshape(-1, label.shape[-1]).sum(0)))
    return image.shape[-1] // 2


def prediction_picture(image: np.ndarray, label: np.ndarray | None, predicted: np.ndarray) -> np.ndarray:
    """The case's slice twice, side by side: the label over it (left), the prediction over it (right).

    Args:
        image: ``[C, *S]``; label, predicted: ``[*S]`` class maps.

    Returns:
        RGB uint8 ``[H, 2 W, 3]``.
    """
    k = _slice_index(image, label)  # one slice for both panels: the label's
    view, guess = (image, predicted) if k is None else (image[..., k], predicted[..., k])
    truth = np.zeros(view.shape[1:], np.int64) if label is None else (label if k is None else label[..., k])
    return np.concatenate([overlay_pixels(view, truth), overlay_pixels(view, guess)], axis=1)


def mask_picture(
    image: np.ndarray, label: np.ndarray | None, masked: torch.Tensor, grid: tuple[int, ...]
) -> np.ndarray:
    """Where a pretraining mask falls on a case: the hidden patches (class 1) and, beside them, the lesion
    label (so a reader sees whether the lesion patches are masked first).

    Args:
        image: ``[C, *S]``; label: ``[*S]`` or None; masked: ``[N]`` bool on the patch ``grid`` (``N = prod(grid)``).

    Returns:
        RGB uint8 ``[H, 2 W, 3]``.
    """
    patches = masked.reshape(1, 1, *grid).float()
    hidden = F.interpolate(patches, size=tuple(image.shape[1:]), mode="nearest")[0, 0].numpy().astype(np.int64)
    return prediction_picture(image, label, hidden)  # (the label left, the hidden patches right)
