"""The run report: ``RUN_DIR/report/report.html`` (one self-contained file, its figures inline, opens offline)
and ``report.md`` with its PNG figures beside it, drawn with matplotlib from the run's record
(``results/rounds.json``: aggregates only, so the report holds no site's picture).

It shows what ran (method, strategy, sites, the plan, privacy settings and what each epsilon covers),
the curves per round (loss, masking ratio, Dice per site, epsilon against its budget), the final Dice
table (the summary's), and the sites that failed or were refused, with their reasons.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from amlp_core import plots
from amlp_core.engine.artefacts import KIND_RESULTS
from amlp_core.plots import ReportError, curves_png
from fedamlp import protocol as P
from server.results import BUDGET, RunResults

log = logging.getLogger(__name__)
REPORT_DIR = "report"


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
        if curves:
            budget = info.get(BUDGET) if title.startswith("Epsilon") else None
            out[title] = curves_png(curves, title, hline=float(budget) if isinstance(budget, (int, float)) else None)
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
    summary = results.summary()  # what ran, the final Dice, privacy, failures (the summary's own text)
    out = plots.write_report(run_dir / REPORT_DIR, "fedamlp run report", summary, _figures(results.rows, results.info))
    log.info("wrote the run report %s", out)
    return out
