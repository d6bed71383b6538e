"""The live status page of a federated run: ``fedamlp status RUN_DIR`` serves it on loopback.

The page (plain HTML and a few lines of script, no build step) asks ``/state.json`` every two seconds;
the state is read from the run folder as the server writes it (``results/rounds.json``, ``FAILED``,
``model/``): the phase and round, seconds per round and an estimate of the time left, each site's
last outcome (ok, error, missing, rejected) with its last error, its last figures (Dice, epsilon), and
the epsilon spent against the budget. It shows the final state once the run has ended. Standard library
only (``http.server``).
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from amlp_core import protocol as P
from amlp_core.errors import AMLPError
from server.results import BUDGET, RecordError, RunRecord

log = logging.getLogger(__name__)
#: What makes a folder a run folder the page can watch, before its first round is recorded.
RUN_MARKERS = ("results/rounds.json", "config.yaml", "run_config.toml", "superlink.log", "server_checkpoint.pt")


class StatusError(AMLPError):
    """The folder is not a run, or the page cannot be served; the message says which."""


def run_state(run_dir: Path) -> dict[str, Any]:
    """What the page shows, read from ``run_dir`` now (aggregates only: what ``rounds.json`` holds)."""
    try:
        record = RunRecord.read(run_dir)
    except RecordError:  # (not written yet, or being rewritten: the next poll reads it)
        record = RunRecord(info={}, rows=[])
    info = record.info
    failed = run_dir / "FAILED"
    outcome = "failed" if failed.is_file() else ("finished" if (run_dir / "model").is_dir() else "in progress")
    rounds = record.select(kind=P.TRAIN, aggregate=True)
    last = rounds[-1] if rounds else None
    seconds = [s for s in (r.number(P.SECONDS) for r in rounds) if s is not None]
    planned = int(info.get("pretrain rounds", 0) or 0) + int(info.get("finetune rounds", 0) or 0)
    left = max(planned - len(rounds), 0)
    per_round = sum(seconds) / len(seconds) if seconds else None
    sites: dict[str, dict[str, Any]] = {}
    for r in record.select(aggregate=False):
        entry = sites.setdefault(r.site, {"site": r.site})
        entry.update(status=r.status, phase=r.phase.value, round=r.round)
        if r.get("error"):
            entry["error"] = str(r.get("error"))[:300]
        if r.kind == P.EVALUATE and r.number(P.DICE_MEAN) is not None:
            entry[P.DICE_MEAN] = r.number(P.DICE_MEAN)
        if r.number(P.EPSILON) is not None:
            entry["epsilon"] = r.number(P.EPSILON)
    budget = info.get(BUDGET) if isinstance(info.get(BUDGET), (int, float)) else None
    final = record.final_evaluation()
    return {
        "run": str(run_dir),
        "outcome": outcome,
        "failure": failed.read_text().strip()[:500] if failed.is_file() else "",
        "phase": last.phase.value if last else "",
        "round": last.round if last else 0,
        "rounds_done": len(rounds),
        "rounds_planned": planned,
        "seconds_per_round": per_round,
        "seconds_left": per_round * left if per_round is not None and outcome == "in progress" else None,
        P.DICE_MEAN: final.number(P.DICE_MEAN) if final else None,
        "epsilon_budget": budget,
        "sites": sorted(sites.values(), key=lambda e: e["site"]),
    }


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>fedamlp run status</title>
<style>
body{font-family:sans-serif;margin:1.5em;max-width:1000px}
table{border-collapse:collapse;margin-top:1em}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}
.ok{color:#1a7f37}.error,.rejected,.failed{color:#b00}.missing{color:#a60}.finished{color:#1a7f37}
#outcome{font-weight:bold}
</style></head><body>
<h1>Federated run</h1>
<p id="run"></p>
<p>State: <span id="outcome">loading</span> <span id="failure"></span></p>
<p>Phase <b id="phase">-</b>, round <b id="round">-</b> (<span id="done">0</span> of
<span id="planned">?</span> rounds); <span id="pace"></span></p>
<p>Mean test Dice (all sites, last evaluation): <b id="dice">-</b></p>
<table><thead><tr><th>site</th><th>last round</th><th>status</th><th>Dice</th><th>epsilon</th><th>last error</th>
</tr></thead><tbody id="sites"></tbody></table>
<script>
function fmt(v, d) { return (v === null || v === undefined) ? "-" : Number(v).toFixed(d); }
function text(id, v) { document.getElementById(id).textContent = v; }
async function refresh() {
  try {
    const s = await (await fetch("state.json", {cache: "no-store"})).json();
    text("run", s.run); text("outcome", s.outcome); text("failure", s.failure || "");
    document.getElementById("outcome").className = s.outcome;
    text("phase", s.phase || "-"); text("round", s.round || "-");
    text("done", s.rounds_done); text("planned", s.rounds_planned || "?");
    text("pace", s.seconds_per_round === null ? "" : fmt(s.seconds_per_round, 1) + " s per round" +
      (s.seconds_left === null ? "" : ", about " + Math.round(s.seconds_left) + " s left"));
    text("dice", fmt(s.dice_mean, 4));
    const body = document.getElementById("sites");
    body.replaceChildren(...s.sites.map(e => {
      const row = document.createElement("tr");
      const eps = e.epsilon === undefined ? "-" : fmt(e.epsilon, 3) +
        (s.epsilon_budget === null ? "" : " of " + s.epsilon_budget);
      for (const v of [e.site, (e.phase || "") + " " + (e.round || ""), e.status, fmt(e.dice_mean, 4), eps,
                       e.error || ""]) {
        const cell = document.createElement("td"); cell.textContent = v; row.appendChild(cell);
      }
      row.children[2].className = e.status;
      return row;
    }));
  } catch (err) { text("outcome", "no answer from the status server"); }
  if (document.getElementById("outcome").textContent === "in progress" ||
      document.getElementById("outcome").textContent === "loading") { setTimeout(refresh, 2000); }
}
refresh();
</script></body></html>
"""


def _handler(run_dir: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path in ("/", "/index.html"):
                body, kind = PAGE.encode(), "text/html; charset=utf-8"
            elif self.path.split("?")[0] == "/state.json":
                body, kind = json.dumps(run_state(run_dir)).encode(), "application/json"
            else:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
            log.debug("status page: " + format, *args)

    return Handler


def status_server(run_dir: str | Path, port: int = 8765, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """The status page's server for ``run_dir`` (not yet serving: call ``serve_forever``).

    Raises:
        StatusError: ``run_dir`` is not a run folder, or the port cannot be bound (in use).
    """
    run = Path(run_dir)
    if not run.is_dir() or not any((run / marker).exists() for marker in RUN_MARKERS):
        raise StatusError(f"{run} is not a federated run folder (no results/rounds.json, config or SuperLink log)")
    try:
        return ThreadingHTTPServer((host, port), _handler(run))
    except OSError as e:
        raise StatusError(f"cannot serve the status page on {host}:{port}: {e.strerror or e}") from None


def serve_in_background(run_dir: str | Path, port: int = 0, host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, str]:
    """Serve the page from a daemon thread (tests, notebooks); returns the server and its URL."""
    server = status_server(run_dir, port, host)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/"
