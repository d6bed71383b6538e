"""What a lesion task needs beyond Dice per class: post-processing of the predicted label map, and the
metrics a clinician reads (Dice over the images that hold a lesion; on lesion-free images, the share
predicted empty), pooled over sites from counts, never from a site's per-case values.

A "lesion" is any foreground class; an image without foreground in its label is "empty" (BUSI's
normal images).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from amlp_core.config import ModelConfig

#: Mean Dice of the foreground (all classes joined) over the test images whose label holds any.
LESION_DICE = "lesion_dice"
LESION_CASES = "lesion_cases"  # test images whose label holds a lesion
EMPTY_CASES = "empty_cases"  # test images whose label holds none
EMPTY_HITS = "empty_hits"  # of those, the images predicted empty
#: ``EMPTY_HITS / EMPTY_CASES``: the share of lesion-free images predicted empty (1 - the per-image
#: false-positive rate); absent when no test image is lesion-free.
EMPTY_SHARE = "empty_share"
LESION_KEYS = (LESION_DICE, LESION_CASES, EMPTY_CASES, EMPTY_HITS, EMPTY_SHARE)


def post_args(model: ModelConfig) -> dict[str, Any]:
    """The post-processing keyword arguments (:func:`postprocess`) of a model's config."""
    return {
        "keep_largest": model.post_keep_largest,
        "min_share": model.post_min_share,
        "min_confidence": model.post_min_confidence,
    }


def inference_args(model: ModelConfig) -> dict[str, Any]:
    """How a model's config asks to be scored (``evaluate_segmentation``): its post-processing and its
    test-time mirroring."""
    return {**post_args(model), "flips": model.tta_flips}


def postprocess(
    labels: np.ndarray,
    num_classes: int,
    keep_largest: bool = False,
    min_share: float = 0.0,
    min_confidence: float = 0.0,
    probabilities: np.ndarray | None = None,
) -> np.ndarray:
    """Clean a predicted label map, class by class (connected components with full connectivity).

    Args:
        labels: integer ``[*S]`` (2D or 3D).
        num_classes: classes including background.
        keep_largest: keep only the largest component of each foreground class (of those that pass
            ``min_share`` and ``min_confidence``).
        min_share: remove the components smaller than this share of the image's voxels.
        min_confidence: remove the components whose mean probability of their class is below this
            (the per-image decision: a faint blob on a normal image is no lesion); needs ``probabilities``.
        probabilities: ``[K, *S]`` class probabilities behind ``labels``.

    Returns:
        A new label map ``[*S]``, same dtype; removed voxels become background.
    """
    out = np.array(labels, copy=True)
    confident = min_confidence > 0 and probabilities is not None
    if not keep_largest and min_share <= 0 and not confident:
        return out
    structure = np.ones((3,) * out.ndim, dtype=bool)
    min_size = min_share * out.size
    for k in range(1, num_classes):
        components, n = ndimage.label(out == k, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]  # [n] voxels per component
        keep = sizes >= min_size
        if confident:
            assert probabilities is not None
            mass = np.bincount(components.ravel(), weights=probabilities[k].ravel(), minlength=n + 1)[1:]
            keep &= mass / np.maximum(sizes, 1) >= min_confidence
        if keep_largest and keep.any():  # the largest of the components that pass the other tests
            keep &= np.arange(n) == int(np.argmax(np.where(keep, sizes, -1)))
        out[(components > 0) & ~keep[np.maximum(components - 1, 0)]] = 0
    return out


class LesionTally:
    """Per-image lesion metrics summed over a test set: the Dice of each image that holds a lesion, and
    how many lesion-free images were predicted empty."""

    def __init__(self) -> None:
        self.dice_sum = 0.0
        self.lesion_cases = 0
        self.empty_cases = 0
        self.empty_hits = 0

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """One image: ``pred`` and ``truth`` integer label maps ``[*S]`` of the same shape."""
        p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
        if t.any():
            self.dice_sum += 2.0 * float((p & t).sum()) / float(p.sum() + t.sum())
            self.lesion_cases += 1
        else:
            self.empty_cases += 1
            self.empty_hits += int(not p.any())

    def metrics(self) -> dict[str, float]:
        """:data:`LESION_KEYS` (``EMPTY_SHARE`` only when some image is lesion-free; ``LESION_DICE`` NaN
        when none holds a lesion)."""
        out: dict[str, float] = {
            LESION_DICE: self.dice_sum / self.lesion_cases if self.lesion_cases else float("nan"),
            LESION_CASES: self.lesion_cases,
            EMPTY_CASES: self.empty_cases,
            EMPTY_HITS: self.empty_hits,
        }
        if self.empty_cases:
            out[EMPTY_SHARE] = self.empty_hits / self.empty_cases
        return out


def pool_lesion_metrics(sites: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The lesion metrics of several sites' test sets as one: Dice weighted by each site's lesion images,
    the empty share from the summed counts (a plain weighted mean by test cases would weigh a site's
    Dice by its normal images too). Sites that did not report them are left out.

    Returns:
        :data:`LESION_KEYS` (as :meth:`LesionTally.metrics`), or ``{}`` when no site reported them.
    """
    reported = [s for s in sites if LESION_CASES in s and EMPTY_CASES in s]
    if not reported:
        return {}
    tally, weighed = LesionTally(), 0
    for s in reported:
        n = int(s[LESION_CASES])
        dice = float(s.get(LESION_DICE, math.nan))
        if n and not math.isnan(dice):
            tally.dice_sum += dice * n
            weighed += n
        tally.lesion_cases += n
        tally.empty_cases += int(s[EMPTY_CASES])
        tally.empty_hits += int(s.get(EMPTY_HITS, 0))
    out = tally.metrics()
    out[LESION_DICE] = tally.dice_sum / weighed if weighed else math.nan
    return out
