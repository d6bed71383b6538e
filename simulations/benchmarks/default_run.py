"""The default federated run as a new user tries it: the final Dice and the wall time against their targets.

Each row is one ``fedamlp simulate --data DATA --sites N [--set ...]`` run, started here as a user would
start it (a subprocess of the CLI, the product's own defaults, only the row's ``--set`` values added), or
a finished run folder read back (``--read "NAME=RUN_DIR=K=V;K=V"``, the values it was started with: its wall
time is then the server's own, from its record: it leaves out the start-up, about half a minute). A row reports the federated mean Dice after the last round (pooled over the sites' test cases),
each class's, on lesion images also the lesion Dice and the lesion-free images predicted empty (``--metric
lesion_dice`` holds the lesion Dice against the target), the Dice at every evaluated round, the wall time, and whether both targets are met (issue 27
item 7: at least 0.80 mean Dice within 25 minutes on the 2-core machine at 10 % labels). Resumable: rows
already in ``--out`` are kept. ::

    python -m simulations.benchmarks.default_run --row default= --row copy_paste=train.semi_supervised=copy_paste \\
        --set train.label_fraction=0.1 --out results/default_run.json
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from amlp_core.engine.lesions import EMPTY_CASES, EMPTY_HITS, LESION_DICE, LESION_KEYS
from amlp_core.protocol import ALL_SITES, DICE_MEAN, DICE_PREFIX
from server.results import RunResults
from simulations.benchmarks.common import benchmark_parser, machine, table, write_json, write_results

log = logging.getLogger(__name__)


def _parser():
    p = benchmark_parser(__doc__, "results/default_run.json")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="NAME=K=V;K=V",
        help="a run: its name and its own --set values (;-separated; none: the defaults)",
    )
    p.add_argument(
        "--read",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR=K=V;K=V",
        help="a finished run, and its --set values",
    )
    p.add_argument("--runs", default="runs/default_run", help="where the rows' run folders go")
    p.add_argument(
        "--metric",
        default=DICE_MEAN,
        choices=(DICE_MEAN, LESION_DICE),
        help="the figure held against --target-dice: the mean Dice over the classes, or the lesion Dice (lesion "
        "images such as BUSI: the Dice over the test images that hold a lesion)",
    )
    p.add_argument("--target-dice", type=float, default=0.80)
    p.add_argument("--target-minutes", type=float, default=25.0)
    return p


def simulate_command(data: str, sites: int, run_dir: Path, sets: list[str]) -> list[str]:
    """The CLI command a user would type for this row (``sets``: ``KEY=VALUE`` items)."""
    command = [sys.executable, "-m", "fedamlp.cli", "simulate", "--data", data, "--sites", str(sites)]
    command += ["--out", str(run_dir), "--overwrite"]
    for item in sets:
        command += ["--set", item]
    return command


def read_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's figures: the pooled Dice after the last round (mean and per class), the pooled
    mean Dice of every evaluated round, and the server's wall time (from its first round to its summary)."""
    results = RunResults.read(run_dir)
    final = next((r for r in results.final_dice() if r["site"] == ALL_SITES), None)
    if final is None:
        raise SystemExit(f"default_run: {run_dir} holds no evaluated round")
    curve = [
        {"round": r["round"], **{k: r[k] for k in (DICE_MEAN, LESION_DICE) if k in r}}
        for r in results.rows
        if r["kind"] == "evaluate" and r["site"] == ALL_SITES and DICE_MEAN in r
    ]
    return {
        DICE_MEAN: final[DICE_MEAN],
        **{k: v for k, v in final.items() if k.startswith(DICE_PREFIX) and k != DICE_MEAN},
        **{k: final[k] for k in LESION_KEYS if k in final},
        "rounds": final["round"],
        "curve": curve,
        "server_seconds": results.info.get("server seconds"),
    }


def _row(name: str, run_dir: Path, seconds: float | None, sets: list[str], args) -> dict[str, Any]:
    row = {"name": name, "sets": sets, "run_dir": str(run_dir), **read_run(run_dir)}
    row["timed"] = "the command" if seconds is not None else "the server (no start-up)"
    row["seconds"] = seconds if seconds is not None else row["server_seconds"]
    row["minutes"] = row["seconds"] / 60 if row["seconds"] is not None else None
    row["meets_dice"] = row.get(args.metric, float("nan")) >= args.target_dice
    row["meets_time"] = row["minutes"] is not None and row["minutes"] <= args.target_minutes
    return row


EMPTY_COLUMN = "lesion-free predicted empty"  # the Markdown column of _empty (as the comparison's report names it)


def _empty(row: dict[str, Any]) -> str:
    """Lesion-free test images predicted empty, as ``"hits of cases"`` (empty when the data has none)."""
    return f"{row[EMPTY_HITS]} of {row[EMPTY_CASES]}" if row.get(EMPTY_CASES) else ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {r["name"] for r in rows}
    header = {"benchmark": "default_run", "machine": machine(), "data": args.data, "sites": args.sites}
    header |= {"common_sets": args.set, "metric": args.metric}
    header |= {"target_dice": args.target_dice, "target_minutes": args.target_minutes}
    for item in args.read:
        name, run_dir, own = (item.split("=", 2) + [""])[:3]
        if name not in done:
            rows.append(_row(name, Path(run_dir), None, [s for s in own.split(";") if s], args))
            write_json(out, {**header, "rows": rows})
    for item in args.row:
        name, _, own = item.partition("=")
        if name in done:
            continue
        sets = args.set + [s for s in own.split(";") if s]
        run_dir = Path(args.runs) / name
        command = simulate_command(args.data, args.sites, run_dir, sets)
        log.info("default_run %s: %s", name, " ".join(command[3:]))
        started = time.monotonic()
        code = subprocess.run(command).returncode
        if code != 0:
            raise SystemExit(f"default_run: the run {name} exited with {code} (see {run_dir}/simulation.log)")
        rows.append(_row(name, run_dir, time.monotonic() - started, sets, args))
        write_json(out, {**header, "rows": rows})
    lesions = any(EMPTY_CASES in r for r in rows)
    columns = ["name", "sets", DICE_MEAN, *([LESION_DICE, EMPTY_COLUMN] if lesions else [])]
    columns += ["minutes", "timed", "meets_dice", "meets_time"]
    shown = [{**r, "sets": " ".join(r["sets"]) or "(defaults)", EMPTY_COLUMN: _empty(r)} for r in rows]
    markdown = table(shown, columns)
    write_results(out, {**header, "rows": rows}, markdown)
    return {**header, "rows": rows}


if __name__ == "__main__":
    main()
