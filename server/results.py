"""The run's record: per round and per site, as JSON, CSV and a short Markdown summary."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amlp_core import protocol as P
from amlp_core.atomic import atomic_write_text as _atomic_write
from amlp_core.engine.artefacts import KIND_RESULTS, RESULTS_VERSION
from amlp_core.engine.lesions import EMPTY_CASES, EMPTY_HITS, EMPTY_SHARE, LESION_CASES, LESION_DICE
from amlp_core.errors import AMLPError
from amlp_core.protocol import ALL_SITES, Phase

#: The run information saying what the sites' epsilon covers (amlp_core.privacy.coverage), shown with it.
COVERS = "site DP covers"
#: The run information holding the sites' epsilon budget as a number (the report and the status page draw it).
BUDGET = "site DP budget (epsilon)"


RECORD_FILE = "results/rounds.json"  # inside the run folder


class RecordError(AMLPError):
    """The run's record cannot be read; the message names the file."""


@dataclass(frozen=True)
class Row:
    """One row of the run's record: a site's reply in a round, or the round's aggregate (``site`` = ALL)."""

    phase: Phase
    round: int
    kind: str  # P.TRAIN | P.EVALUATE
    site: str  # the site's name, or ALL_SITES
    status: str  # P.OK, P.ERROR, P.MISSING, P.REJECTED
    values: dict[str, Any] = field(default_factory=dict)  # the rest: metrics, bytes, seconds, error, sites_ok

    @property
    def aggregate(self) -> bool:
        return self.site == ALL_SITES

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def number(self, key: str) -> float | None:
        """``key``'s value when it is a number (not a flag), else None."""
        value = self.values.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def as_dict(self) -> dict[str, Any]:
        """The row as it is stored."""
        return {
            "phase": self.phase.value,
            "round": self.round,
            "kind": self.kind,
            "site": self.site,
            "status": self.status,
            **self.values,
        }

    @classmethod
    def parse(cls, raw: Any, where: str) -> Row:
        """A stored row; RecordError naming ``where`` when it is not one."""
        try:
            values = dict(raw)
            return cls(
                phase=Phase(values.pop("phase")),
                round=int(values.pop("round")),
                kind=str(values.pop("kind")),
                site=str(values.pop("site")),
                status=str(values.pop("status")),
                values=values,
            )
        except (TypeError, ValueError, KeyError) as e:
            raise RecordError(f"{where}: a row that is not a round of this product ({type(e).__name__}: {e})") from None


@dataclass
class RunRecord:
    """A federation's record read back (``RUN_DIR/results/rounds.json``): what ran, and its rows in order.
    The one reader of the record: the report, the status page and the benchmarks read it through this."""

    info: dict[str, Any]
    rows: list[Row]

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        """The record of ``run_dir``.

        Raises:
            RecordError: it has none, or not one of this product (the message names the file).
        """
        path = Path(run_dir) / RECORD_FILE
        if not path.is_file():
            raise RecordError(f"{run_dir} is not a federated run folder: it has no {RECORD_FILE}")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RecordError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
        if not isinstance(raw, dict) or raw.get("kind") != KIND_RESULTS or not isinstance(raw.get("rows"), list):
            raise RecordError(f"{path} is not a run record of this product")
        if raw.get("version") != RESULTS_VERSION:
            raise RecordError(f"{path} is version {raw.get('version')!r} of the record; this product reads version 1")
        info = raw.get("info") if isinstance(raw.get("info"), dict) else {}
        return cls(info=dict(info), rows=[Row.parse(r, str(path)) for r in raw["rows"]])

    def select(
        self,
        phase: str | None = None,
        kind: str | None = None,
        site: str | None = None,
        status: str | None = None,
        aggregate: bool | None = None,
    ) -> list[Row]:
        """The rows that match every given field (``aggregate``: the ALL rows, or only the sites')."""
        return [
            r
            for r in self.rows
            if (phase is None or r.phase == phase)
            and (kind is None or r.kind == kind)
            and (site is None or r.site == site)
            and (status is None or r.status == status)
            and (aggregate is None or r.aggregate == aggregate)
        ]

    def final_evaluation(self) -> Row | None:
        """The last evaluation round's aggregate row (all sites' test cases), None before the first."""
        rows = self.select(kind=P.EVALUATE, aggregate=True)
        return rows[-1] if rows else None

    def round_seconds(self, phase: str | None = None) -> float:
        """The server's seconds in the rounds (of ``phase``): the rounds' own time, no start-up."""
        return sum(r.number(P.SECONDS) or 0.0 for r in self.select(phase=phase, aggregate=True))

    def dict_rows(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.rows]


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

    @classmethod
    def read(cls, run_dir: str | Path) -> RunResults:
        """A finished (or stopped) run's results, read back from its record (:class:`RunRecord`)."""
        record = RunRecord.read(run_dir)
        results = cls(Path(run_dir) / "results", [row.as_dict() for row in record.rows])
        results.info = dict(record.info)
        return results

    def sections(self) -> dict[str, list[str]]:
        """The summary's sections, each its Markdown lines (empty where there is nothing to say): ``dice``
        (the final Dice table, and lesion metrics on lesion data), ``privacy`` (epsilon spent), ``failures``
        (the sites'), ``rounds`` (every training round)."""
        out: dict[str, list[str]] = {"dice": [], "privacy": self._privacy_lines(), "failures": [], "rounds": []}
        dice = self.final_dice()
        if dice:
            classes = sorted(k for k in dice[0] if k.startswith(P.DICE_PREFIX) and k != P.DICE_MEAN)
            out["dice"] = [
                "",
                f"## Dice after fine-tuning round {dice[0]['round']}",
                "",
                "| site | cases | " + " | ".join(classes) + " | mean |",
                "|---" * (len(classes) + 3) + "|",
            ]
            for r in dice:
                values = " | ".join(_fmt(r.get(c)) for c in classes + [P.DICE_MEAN])
                out["dice"].append(f"| {r['site']} | {r.get('num-examples', '')} | {values} |")
            out["dice"] += _lesion_lines(dice)
        failures = [r for r in self.rows if r.get("status") not in (None, P.OK)]
        if failures:
            out["failures"] = ["", "## Site failures", ""] + [
                f"- {r['phase']} round {r['round']} ({r['kind']}): {r['site']}: {r['status']}: {r.get('error', '')}"
                for r in failures
            ]
        train = [r for r in self.rows if r["kind"] == "train" and r["site"] == ALL_SITES]
        if train:
            out["rounds"] = [
                "",
                "## Training rounds",
                "",
                "| phase | round | loss | sites ok | seconds |",
                "|---|---|---|---|---|",
            ] + [
                f"| {r['phase']} | {r['round']} | {_fmt(r.get('loss'))} | {r.get('sites_ok', '')} | "
                f"{_fmt(r.get('seconds'))} |"
                for r in train
            ]
        return out

    def summary(self) -> str:
        """summary.md: what ran (the run's info), then every section."""
        lines = ["# Federated run", "", *(f"- {key}: {value}" for key, value in self.info.items())]
        for section in self.sections().values():
            lines += section
        return "\n".join(lines) + "\n"

    def console_summary(self) -> str:
        """What the console shows at the end of a run: the results and the sites' failures, without what ran
        (the report has it) or the rounds (the console showed them)."""
        sections = self.sections()
        lines = [line for name in ("dice", "privacy", "failures") for line in sections[name]]
        return "\n".join(lines).strip() + "\n"

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
