"""The run's record: per round and per site, as JSON, CSV and a short Markdown summary."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from amlp_core.atomic import atomic_write_text as _atomic_write
from amlp_core.engine.artefacts import KIND_RESULTS, RESULTS_VERSION
from amlp_core.engine.lesions import EMPTY_CASES, EMPTY_HITS, EMPTY_SHARE, LESION_CASES, LESION_DICE
from fedamlp import protocol as P
from fedamlp.protocol import ALL_SITES

#: The run information saying what the sites' epsilon covers (amlp_core.privacy.coverage), shown with it.
COVERS = "site DP covers"
#: The run information holding the sites' epsilon budget as a number (the report and the status page draw it).
BUDGET = "site DP budget (epsilon)"


class RunResults:
    """Rows ``{phase, round, kind, site, status, ...metrics}``; rewritten to disk after every round
    (``rounds.json``: ``{"kind": "results", "version", "info", "rows"}``; ``rounds.csv``; ``summary.md``)."""

    def __init__(self, folder: str | Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.folder = Path(folder)
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.info: dict[str, Any] = {}

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"kind": KIND_RESULTS, "version": RESULTS_VERSION, "info": self.info, "rows": self.rows}
        _atomic_write(self.folder / "rounds.json", json.dumps(record, indent=1))
        columns: list[str] = []
        for row in self.rows:
            columns += [c for c in row if c not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        _atomic_write(self.folder / "rounds.csv", buffer.getvalue())
        _atomic_write(self.folder / "summary.md", self.summary())

    def final_dice(self) -> list[dict[str, Any]]:
        """The last evaluation round's rows (each site, then all sites)."""
        evals = [r for r in self.rows if r["kind"] == "evaluate"]
        if not evals:
            return []
        last = max(r["round"] for r in evals)
        return [r for r in evals if r["round"] == last]

    def summary(self) -> str:
        lines = ["# Federated run", ""]
        for key, value in self.info.items():
            lines.append(f"- {key}: {value}")
        dice = self.final_dice()
        if dice:
            classes = sorted(k for k in dice[0] if k.startswith("dice_") and k != "dice_mean")
            lines += [
                "",
                f"## Dice after fine-tuning round {dice[0]['round']}",
                "",
                "| site | cases | " + " | ".join(classes) + " | mean |",
                "|---" * (len(classes) + 3) + "|",
            ]
            for r in dice:
                values = " | ".join(_fmt(r.get(c)) for c in classes + ["dice_mean"])
                lines.append(f"| {r['site']} | {r.get('num-examples', '')} | {values} |")
            lines += _lesion_lines(dice)
        lines += self._privacy_lines()
        failures = [r for r in self.rows if r.get("status") not in (None, P.OK)]
        if failures:
            lines += ["", "## Site failures", ""]
            lines += [
                f"- {r['phase']} round {r['round']} ({r['kind']}): {r['site']}: {r['status']}: {r.get('error', '')}"
                for r in failures
            ]
        train = [r for r in self.rows if r["kind"] == "train" and r["site"] == ALL_SITES]
        if train:
            lines += [
                "",
                "## Training rounds",
                "",
                "| phase | round | loss | sites ok | seconds |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['phase']} | {r['round']} | {_fmt(r.get('loss'))} | {r.get('sites_ok', '')} | "
                f"{_fmt(r.get('seconds'))} |"
                for r in train
            ]
        return "\n".join(lines) + "\n"

    @staticmethod
    def console_summary(summary: str) -> str:
        """``summary`` (the text of summary.md) as the console shows it at the end of a run: the results and
        the sites' failures, without what ran (the report has it) or the rounds (the console showed them)."""
        sections = summary.split("\n## ")[1:]
        kept = [s for s in sections if not s.startswith("Training rounds")]
        return "".join(f"## {s.rstrip()}\n\n" for s in kept).rstrip() + "\n"

    def _privacy_lines(self) -> list[str]:
        """Epsilon spent: each site's last value (site DP) and the server's (server DP)."""
        last: dict[str, Any] = {}
        for r in self.rows:
            if r["kind"] == "train" and r.get("status") == P.OK:
                if "epsilon" in r and r["site"] != ALL_SITES:
                    last[r["site"]] = r["epsilon"]
                if "server_epsilon" in r:
                    last["server (client-level DP)"] = r["server_epsilon"]
        if not last:
            return []
        return [
            "",
            "## Privacy spent (epsilon at privacy.delta)",
            "",
            "| who | epsilon |",
            "|---|---|",
            *(f"| {who} | {_fmt(eps)} |" for who, eps in sorted(last.items())),
            *(["", f"What the sites' epsilon covers: {self.info[COVERS]}."] if COVERS in self.info else []),
        ]


def _lesion_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The lesion table of the final evaluation (when some site has lesion-free test images)."""
    if not any(r.get(EMPTY_CASES) for r in rows):
        return []
    lines = [
        "",
        "Lesion metrics: Dice over the test images that hold a lesion; lesion-free images predicted empty.",
        "",
        "| site | images with a lesion | lesion Dice | lesion-free images | predicted empty |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        hits, empty = r.get(EMPTY_HITS), r.get(EMPTY_CASES)
        share = f"{_fmt(r.get(EMPTY_SHARE))} ({_count(hits)} of {_count(empty)})" if empty else "-"
        lesions = _count(r.get(LESION_CASES))
        lines.append(f"| {r['site']} | {lesions} | {_fmt(r.get(LESION_DICE))} | {_count(empty)} | {share} |")
    return lines


def _count(value: Any) -> str:
    return str(int(value)) if isinstance(value, (int, float)) and not math.isnan(value) else ""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)
