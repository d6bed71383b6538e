"""The run report: ``RUN_DIR/report/report.html`` (one self-contained file, its figures inline, opens offline)
and ``report.md`` with its PNG figures beside it, drawn with matplotlib from the run's record
(``results/rounds.json``: aggregates only, so the report holds no site's picture).

It shows what ran (method, strategy, sites, the plan, privacy settings and what each epsilon covers),
the curves per round (loss, masking ratio, Dice per site, epsilon against its budget), the final Dice
table (the summary's), and the sites that failed or were refused, with their reasons.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from amlp_core.atomic import atomic_write, atomic_write_text
from amlp_core.engine.artefacts import KIND_RESULTS
from amlp_core.errors import AMLPError
from fedamlp import protocol as P
from server.results import BUDGET, RunResults

log = logging.getLogger(__name__)
REPORT_DIR = "report"


class ReportError(AMLPError):
    """The folder holds no run record to report on; the message names it."""


def _record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results" / "rounds.json"
    if not path.is_file():
        raise ReportError(f"{run_dir} is not a federated run folder: it has no results/rounds.json")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict) or record.get("kind") != KIND_RESULTS or not isinstance(record.get("rows"), list):
        raise ReportError(f"{path} is not a run record of this product")
    return record


def _series(rows: list[dict], phase: str, kind: str, key: str) -> dict[str, list[tuple[int, float]]]:
    """``{site: [(round, value), ...]}`` of ``key`` in the ``phase``/``kind`` rounds that hold it."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        value = r.get(key)
        if r["phase"] == phase and r["kind"] == kind and isinstance(value, (int, float)) and r.get("status") == P.OK:
            out[r["site"]].append((int(r["round"]), float(value)))
    return dict(out)


def _figures(rows: list[dict], info: dict[str, Any]) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by title (only those the run has data for)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = [
        ("Training loss per round", [("pretrain", "train", "loss"), ("finetune", "train", "loss")]),
        ("Masking ratio per pretraining round", [("pretrain", "train", P.MASK_RATIO)]),
        ("Test Dice per round (each site, and all)", [("finetune", "evaluate", "dice_mean")]),
        ("Epsilon spent per site", [("pretrain", "train", P.EPSILON), ("finetune", "train", P.EPSILON)]),
    ]
    out = {}
    for title, sources in wanted:
        curves = {
            f"{phase} {site}": points
            for phase, kind, key in sources
            for site, points in _series(rows, phase, kind, key).items()
        }
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        for name, points in sorted(curves.items()):
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, label=name)
        if title.startswith("Epsilon") and isinstance(info.get(BUDGET), (int, float)):
            ax.axhline(float(info[BUDGET]), color="black", linestyle="--", linewidth=1, label="budget")
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        out[title] = buffer.getvalue()
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write the run's report (``report.html``, ``report.md`` and its figures) into ``RUN_DIR/report``.

    Returns:
        The HTML file.

    Raises:
        ReportError: ``run_dir`` holds no readable run record.
    """
    run_dir = Path(run_dir)
    record = _record(run_dir)
    results = RunResults(run_dir / "results", record["rows"])
    results.info = dict(record.get("info") or {})
    figures = _figures(results.rows, results.info)
    folder = run_dir / REPORT_DIR
    folder.mkdir(exist_ok=True)
    summary = results.summary()  # what ran, the final Dice, privacy, failures (the summary's own text)
    md = [summary.rstrip(), "", "## Curves", ""]
    blocks = []
    for i, (title, png) in enumerate(figures.items()):
        name = f"figure_{i + 1}.png"
        atomic_write(folder / name, lambda f, data=png: f.write(data))
        md.append(f"![{title}]({name})")
        data = base64.b64encode(png).decode()
        blocks.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"></figure>')
    atomic_write_text(folder / "report.md", "\n".join(md) + "\n")
    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fedamlp run report</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>",
        _markdown_html(summary),
        "<h2>Curves</h2>",
        *blocks,
        "</body></html>",
    ]
    out = folder / "report.html"
    atomic_write_text(out, "\n".join(page))
    log.info("wrote the run report %s", out)
    return out


def _markdown_html(text: str) -> str:
    """The summary's Markdown (headings, bullet lines, tables, paragraphs) as HTML, every value escaped."""
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
