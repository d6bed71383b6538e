"""The comparison's plot: grouped bars of mean Dice per label fraction (matplotlib, written as SVG)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from simulations.benchmarks.comparison.plan import pct  # noqa: E402


def _metric(cells: Sequence[dict[str, Any]]) -> str:
    """The figure the cells are compared by (``stats.headline``: lesion Dice for lesion data)."""
    return str(cells[0].get("metric", "dice_mean")) if cells else "dice_mean"


def y_axis(cells: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """``(top, tick step)`` of the Dice axis: it starts at 0 and ends at the first tick above every bar and
    error bar (at most 1), so that small differences stay visible without a truncated axis."""
    key = _metric(cells)
    highest = max((c[f"{key}_mean"] + c[f"{key}_std"] for c in cells), default=1.0)
    step = 0.1 if highest <= 0.5 else 0.2
    return min(1.0, max(1, math.ceil(round(highest / step, 6))) * step), step


def bar_plot(cells: Sequence[dict[str, Any]], title: str, subtitle: str = "") -> Figure:
    """Grouped bars of mean Dice (x: label fraction, one bar per method, error bars: std over seeds)."""
    fractions = sorted({c["label_fraction"] for c in cells})
    methods = list(dict.fromkeys(c["method"] for c in cells))
    by = {(c["method"], c["label_fraction"]): c for c in cells}
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    width = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        xs, means, stds = [], [], []
        for g, fraction in enumerate(fractions):
            if (method, fraction) in by:
                xs.append(g - 0.4 + (k + 0.5) * width)
                means.append(by[method, fraction][f"{_metric(cells)}_mean"])
                stds.append(by[method, fraction][f"{_metric(cells)}_std"])
        ax.bar(xs, means, width * 0.9, yerr=stds, capsize=3, label=method, color=f"C{k % 10}")
    top, step = y_axis(cells)
    ax.set_ylim(0, top)
    ax.set_yticks([round(i * step, 6) for i in range(round(top / step) + 1)])
    ax.set_xticks(range(len(fractions)), [f"{pct(f)} labels" for f in fractions])
    ax.set_ylabel("lesion Dice" if _metric(cells) == "lesion_dice" else "mean Dice")
    ax.grid(axis="y", color="#ddd")
    ax.set_axisbelow(True)
    ax.set_title(f"{title}\n{subtitle}" if subtitle else title, loc="left", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def save_plot(cells: Sequence[dict[str, Any]], path: Path, title: str, subtitle: str = "") -> Path:
    """:func:`bar_plot` written to ``path`` (SVG by its suffix)."""
    with plt.rc_context({"svg.fonttype": "none"}):  # text stays text: searchable, and a smaller file
        fig = bar_plot(cells, title, subtitle)
        fig.savefig(path)
    plt.close(fig)
    return path
