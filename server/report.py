"""The run report: ``RUN_DIR/report/report.html`` (one self-contained file, its figures inline, opens offline)
and ``report.md`` with its PNG figures beside it, drawn with matplotlib from the run's record
(``results/rounds.json``: aggregates only, so the report holds no site's picture).

It shows what ran (method, strategy, sites, the plan, privacy settings and what each epsilon covers),
the curves per round (loss, masking ratio, Dice per site, epsilon against its budget), the final Dice
table (the summary's), and the sites that failed or were refused, with their reasons.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from amlp_core import plots
from amlp_core import protocol as P
from amlp_core.plots import curves_png
from server.results import BUDGET, RunRecord, RunResults

log = logging.getLogger(__name__)
REPORT_DIR = "report"


def _series(record: RunRecord, phase: str, kind: str, key: str) -> dict[str, list[tuple[int, float]]]:
    """``{site: [(round, value), ...]}`` of ``key`` in the ``phase``/``kind`` rounds that hold it."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in record.select(phase=phase, kind=kind, status=P.OK):
        value = r.number(key)
        if value is not None:
            out[r.site].append((r.round, value))
    return dict(out)


def _figures(record: RunRecord) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by title (only those the run has data for)."""
    wanted = [
        ("Training loss per round", [("pretrain", "train", "loss"), ("finetune", "train", "loss")]),
        ("Masking ratio per pretraining round", [("pretrain", "train", P.MASK_RATIO)]),
        ("Test Dice per round (each site, and all)", [("finetune", "evaluate", P.DICE_MEAN)]),
        ("Epsilon spent per site", [("pretrain", "train", P.EPSILON), ("finetune", "train", P.EPSILON)]),
    ]
    out = {}
    for title, sources in wanted:
        curves = {
            f"{phase} {site}": points
            for phase, kind, key in sources
            for site, points in _series(record, phase, kind, key).items()
        }
        if curves:
            budget = record.info.get(BUDGET) if title.startswith("Epsilon") else None
            out[title] = curves_png(curves, title, hline=float(budget) if isinstance(budget, (int, float)) else None)
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write the run's report (``report.html``, ``report.md`` and its figures) into ``RUN_DIR/report``.

    Returns:
        The HTML file.

    Raises:
        RecordError: ``run_dir`` holds no readable run record.
    """
    run_dir = Path(run_dir)
    record = RunRecord.read(run_dir)
    results = RunResults(run_dir / "results", record.dict_rows())
    results.info = record.info
    summary = results.summary()  # what ran, the final Dice, privacy, failures (the summary's own text)
    out = plots.write_report(run_dir / REPORT_DIR, "fedamlp run report", summary, _figures(record))
    log.info("wrote the run report %s", out)
    return out
