"""Every figure and report page the product draws, in one place (matplotlib, written without a display).

- :func:`curves_png`: lines per round (the run report, a site's report);
- :func:`bar_plot` / :func:`save_plot`: grouped bars of Dice per label fraction (the method comparison);
- :func:`write_report`: a folder with ``report.html`` (one self-contained file, figures inline, opens
  offline) and its Markdown twin ``report.md`` with the figures as PNG files beside it;
- :func:`markdown_html`: the small Markdown the summaries use (headings, bullets, tables) as HTML.

Who draws what decides where it is written: the server's report holds aggregates only; a site's report, with
its pictures, is written in the site's own state folder and never leaves it.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from amlp_core.atomic import atomic_write, atomic_write_text  # noqa: E402
from amlp_core.errors import AMLPError  # noqa: E402


class ReportError(AMLPError):
    """The folder holds nothing to report on; the message names it."""


#: ``{curve name: [(x, y), ...]}``
Curves = Mapping[str, Sequence[tuple[float, float]]]


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _write_bytes(data: bytes, f: IO[bytes]) -> None:
    f.write(data)


def curves_png(curves: Curves, title: str, xlabel: str = "round", hline: float | None = None) -> bytes:
    """One line per curve (sorted by name), ``hline`` dashed (a budget), as PNG bytes."""
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for name, points in sorted(curves.items()):
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, label=name)
    if hline is not None:
        ax.axhline(hline, color="black", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _metric(cells: Sequence[dict[str, Any]]) -> str:
    """The figure the cells are compared by (lesion Dice for lesion data, else the mean Dice)."""
    return str(cells[0].get("metric", "dice_mean")) if cells else "dice_mean"


def y_axis(cells: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """``(top, tick step)`` of the Dice axis: it starts at 0 and ends at the first tick above every bar and
    error bar (at most 1), so that small differences stay visible without a truncated axis."""
    key = _metric(cells)
    highest = max((c[f"{key}_mean"] + c[f"{key}_std"] for c in cells), default=1.0)
    step = 0.1 if highest <= 0.5 else 0.2
    return min(1.0, max(1, math.ceil(round(highest / step, 6))) * step), step


def bar_plot(cells: Sequence[dict[str, Any]], title: str, subtitle: str = "") -> Figure:
    """Grouped bars of mean Dice (x: label fraction, one bar per method, error bars: std over seeds).

    Args:
        cells: one dict per method and label fraction: ``method``, ``label_fraction``, ``METRIC_mean`` and
            ``METRIC_std`` (``METRIC``: the cells' ``metric``, default ``dice_mean``).
    """
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
    ax.set_xticks(range(len(fractions)), [f"{f * 100:g} % labels" for f in fractions])
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


def write_report(folder: Path, title: str, markdown: str, figures: Mapping[str, bytes]) -> Path:
    """``folder/report.html`` (self-contained) and ``folder/report.md`` with ``figure_K.png`` beside it.

    Args:
        markdown: the report's text (:func:`markdown_html`'s subset), then the figures under "Figures".
        figures: PNG bytes by caption, in order.

    Returns:
        The HTML file. Every file is replaced atomically.
    """
    folder.mkdir(parents=True, exist_ok=True)
    md = [markdown.rstrip(), "", "## Figures", ""] if figures else [markdown.rstrip()]
    blocks = []
    for i, (caption, png) in enumerate(figures.items()):
        name = f"figure_{i + 1}.png"
        atomic_write(folder / name, functools.partial(_write_bytes, png))
        md.append(f"![{caption}]({name})")
        data = base64.b64encode(png).decode()
        blocks.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    atomic_write_text(folder / "report.md", "\n".join(md) + "\n")
    page = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%;image-rendering:pixelated}"
        "figcaption{font-size:small;color:#555}</style></head><body>",
        markdown_html(markdown),
        *(["<h2>Figures</h2>", *blocks] if blocks else []),
        "</body></html>",
    ]
    out = folder / "report.html"
    atomic_write_text(out, "\n".join(page))
    return out


def markdown_html(text: str) -> str:
    """Markdown (headings, bullet lines, tables, paragraphs) as HTML, every value escaped."""
    out, table = [], False
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            out.append(("<table>" if not table else "") + "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            table = True
            continue
        if line.startswith("|"):  # the header rule
            continue
        if table:
            out.append("</table>")
            table = False
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 4)
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if table:
        out.append("</table>")
    return "\n".join(out)
