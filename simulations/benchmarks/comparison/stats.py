"""The comparison's statistics: mean and spread over seeds per cell, and differences to scratch paired by seed."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import Any

from amlp_core.engine.lesions import EMPTY_CASES, EMPTY_SHARE, LESION_DICE
from simulations.benchmarks.common import (
    SEMI_JOIN,
    mean_std,
    paired_test,
    seed_differences,
)
from simulations.benchmarks.comparison.plan import SCRATCH, SUPERVISED, split_semi

log = logging.getLogger(__name__)


def headline(rows: Sequence[dict[str, Any]]) -> str:
    """The figure the comparison pairs and plots: the lesion Dice when the test sets hold lesion-free
    images (lesion data such as BUSI), else the mean Dice over the classes."""
    return LESION_DICE if any(r.get(EMPTY_CASES) for r in rows) else "dice_mean"


def dice_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``dice_1``, ``dice_2``, ... (by class index), then ``dice_mean``, then, for lesion data, the lesion
    Dice and the share of lesion-free images predicted empty."""
    keys = {k for r in rows for k in r if k.startswith("dice_") and k != "dice_mean"}
    ordered = sorted(keys, key=lambda k: int(k.split("_")[1]) if k.split("_")[1].isdigit() else 0) + ["dice_mean"]
    return ordered + ([LESION_DICE, EMPTY_SHARE] if headline(rows) == LESION_DICE else [])


def paired_differences(
    rows: Sequence[dict[str, Any]], method: str, fraction: float, metric: str = "dice_mean", reference: str = SCRATCH
) -> list[float]:
    """``metric`` of ``method`` minus that of ``reference`` (scratch by default), one value per seed that has
    both runs (:func:`~simulations.benchmarks.common.seed_differences`)."""
    return list(seed_differences(rows, "method", method, reference, fraction, metric).values())


def _references(method: str) -> list[tuple[str, str]]:
    """The rows ``method`` is paired with, as ``(key prefix, row)``: scratch; for a semi-supervised row also
    the same start fine-tuned on its labels only, and, from a pretrained start, scratch with the same
    semi-supervised loss."""
    start, semi = split_semi(method)
    if semi == SUPERVISED:
        return [("vs_scratch", SCRATCH)] if method != SCRATCH else []
    refs = [("vs_scratch", SCRATCH), ("vs_supervised", start)]
    if start != SCRATCH:
        refs.append(("vs_scratch_semi", SCRATCH + SEMI_JOIN + semi))
    return refs


def aggregate(
    rows: Sequence[dict[str, Any]], methods: Sequence[str], fractions: Sequence[float]
) -> list[dict[str, Any]]:
    """One entry per (method, fraction) that has rows: mean and std over the seeds of every Dice, seconds,
    and the :func:`headline` figure minus scratch's, paired by seed (``vs_scratch_*``); a semi-supervised
    row's also minus its start's supervised row (``vs_supervised_*``) and, from a pretrained start, minus
    scratch's with the same semi-supervised loss (``vs_scratch_semi_*``)."""
    keys, out, metric = dice_keys(rows), [], headline(rows)
    for method in methods:
        for fraction in fractions:
            cell = [r for r in rows if r["method"] == method and r["label_fraction"] == fraction]
            if not cell:
                continue
            entry: dict[str, Any] = {
                "method": method,
                "label_fraction": fraction,
                "seeds": sorted(r["seed"] for r in cell),
                "metric": metric,
            }
            for key in keys:
                values = [r[key] for r in cell if key in r]
                entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std(values)
            entry["seconds_mean"] = round(statistics.fmean(r["seconds"] for r in cell), 1)
            for key, reference in _references(method):
                deltas = paired_differences(rows, method, fraction, metric, reference)
                if deltas:
                    test = paired_test(deltas)
                    entry[f"{key}_mean"], entry[f"{key}_std"] = test["mean"], test["std"]
                    entry[f"{key}_seeds"] = len(deltas)
                    entry[f"{key}_p"], entry[f"{key}_verdict"] = test["p"], test["verdict"]
            changes = [r["encoder_change"] for r in cell if r.get("encoder_change") is not None]
            if changes:
                entry["encoder_change_mean"] = round(statistics.fmean(changes), 5)
            out.append(entry)
    return out
