"""Faults at scale: a long run stays flat in memory and leaves nothing behind; many sites complete.

- ``soak``: 8 sites, 50 rounds (20 pretraining + 30 fine-tuning) on phantoms. The resident memory of
  every process of the simulation (SuperLink, ServerApp, the simulation engine and its workers) is
  sampled every second; its growth from the end of round 10 (warm-up) to the end of the run must stay
  under 5 %. After the run no process of it is left and its folder holds only what a run writes.
- ``sites32``: 32 sites, 1 + 2 rounds. Its peak memory against the 8-site run's gives the memory
  each further site costs.

    python -m simulations.benchmarks.scale --out results/scale.json

Resumable: experiments already in ``--out`` are kept. One seed, the machine's own CPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from amlp_core.config import build_config
from amlp_core.logs import setup_logging
from amlp_core.runfolder import RUN_ENTRIES
from server.results import RecordError, RunRecord
from simulations.benchmarks.common import SMALL_FEDERATION, machine, table, write_json
from simulations.processes import MARKER
from simulations.simulate import simulate

log = logging.getLogger(__name__)

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "soak": {"federation.sites": 8, "federation.pretrain_rounds": 20, "federation.finetune_rounds": 30},
    "sites32": {"federation.sites": 32, "federation.pretrain_rounds": 1, "federation.finetune_rounds": 2},
}
COMMON: dict[str, Any] = {
    **SMALL_FEDERATION,
    "data.synthetic_cases": 16,  # per site
    "federation.min_sites": 2,
    "federation.finetune_local_steps": 4,
    "federation.local_epochs": 1,
}
WARM_UP_ROUNDS = 10

#: The process that runs the ServerApp and the simulation engine: it holds every site's reply of a
#: round, so it is where memory grows with the number of sites (the engine's workers are a fixed pool).
SERVER_PROCESS = "flwr-simulation"
RSS_GROWTH_LIMIT = 0.05


def _rss_kib(pid: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def simulation_processes() -> dict[int, tuple[str, int]]:
    """Every process (not this one) that carries a simulation's marker: ``pid -> (name, RSS KiB)``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            if any(item.startswith(MARKER.encode() + b"=") for item in env):
                name = (entry / "comm").read_text().strip()
                found[int(entry.name)] = (name, _rss_kib(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


class Sampler(threading.Thread):
    """Samples the simulation's memory and how many rounds the run has recorded, every ``every`` s."""

    def __init__(self, run_dir: Path, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.every = run_dir, every
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def rounds(self) -> int:
        try:
            record = RunRecord.read(self.run_dir)
        except RecordError:  # (not written yet, or being rewritten)
            return 0
        return len({(r.phase, r.round) for r in record.rows})

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(self.every):
            procs = simulation_processes()
            by_name: dict[str, int] = {}
            for name, rss in procs.values():
                by_name[name] = by_name.get(name, 0) + rss
            self.samples.append(
                {
                    "t": round(time.monotonic() - start, 1),
                    "rounds": self.rounds(),
                    "rss_mib": round(sum(rss for _, rss in procs.values()) / 1024, 1),
                    "by_process_mib": {k: round(v / 1024, 1) for k, v in sorted(by_name.items())},
                }
            )


def stray_files(run_dir: Path) -> list[str]:
    """What the run folder holds that a run does not write (temporary files left behind, ...)."""
    stray = [p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES]
    stray += [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.startswith(".tmp")]
    return sorted(stray)


def temp_entries() -> set[str]:
    """What a simulation could leave in the system's temporary folder: our Ray folders, Ray's default sessions."""
    tmp = Path(tempfile.gettempdir())
    return {p.name for p in tmp.glob("fedamlp-*")} | {f"ray/{p.name}" for p in (tmp / "ray").glob("session_*")}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def growth(samples: list[dict[str, Any]], key=lambda s: s["rss_mib"]) -> tuple[float, float]:
    """Memory at the start and at the end of ``samples`` (medians of their first and last tenth: one
    sample may catch a worker mid-round)."""
    tenth = max(1, len(samples) // 10)
    return _median([key(s) for s in samples[:tenth]]), _median([key(s) for s in samples[-tenth:]])


def run_experiment(name: str, runs: Path) -> dict[str, Any]:
    """One experiment: its memory samples summarised, and what it left behind."""
    run_dir = runs / name
    cfg = build_config({**COMMON, **EXPERIMENTS[name], "federation.run_dir": str(run_dir)})
    temp_before = temp_entries()
    sampler = Sampler(run_dir)
    started = time.monotonic()
    sampler.start()
    try:
        simulate(cfg, timeout=3 * 3600, overwrite=True)
    finally:
        sampler.stop.set()
        sampler.join()
    seconds = time.monotonic() - started
    time.sleep(2)  # the processes' own exit
    samples = sampler.samples
    total_rounds = cfg.federation.pretrain_rounds + cfg.federation.finetune_rounds
    # After warm-up, until the last round is recorded (then the processes start to exit).
    warm = [s for s in samples if min(WARM_UP_ROUNDS, total_rounds - 1) <= s["rounds"] < total_rounds]
    peak = max(samples, key=lambda s: s["rss_mib"])
    result = {
        "experiment": name,
        "sites": cfg.federation.sites,
        "rounds": total_rounds,
        "seconds": round(seconds, 1),
        "peak_rss_mib": peak["rss_mib"],
        "peak_by_process_mib": peak["by_process_mib"],
        "leftover_processes": sorted(n for n, _ in simulation_processes().values()),
        "stray_files": stray_files(run_dir) + sorted(temp_entries() - temp_before),
        "samples": samples,
    }
    if name == "soak" and warm:
        start_rss, end_rss = growth(warm)
        server_start, server_end = growth(warm, lambda s: s["by_process_mib"].get(SERVER_PROCESS, 0.0))
        result.update(
            rss_after_warmup_mib=start_rss,
            rss_at_end_mib=end_rss,
            rss_growth=round(end_rss / start_rss - 1, 4),
            server_rss_growth=round(server_end / server_start - 1, 4),
            flat=end_rss / start_rss - 1 < RSS_GROWTH_LIMIT and server_end / server_start - 1 < RSS_GROWTH_LIMIT,
        )
    return result


def process_peaks(samples: list[dict[str, Any]]) -> dict[str, float]:
    """The peak RSS (MiB) of each kind of process over the run."""
    peaks: dict[str, float] = {}
    for sample in samples:
        for name, mib in sample["by_process_mib"].items():
            peaks[name] = max(peaks.get(name, 0.0), mib)
    return peaks


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row an experiment: the whole simulation's peak, its share per site, the server process's peak,
    and (for ``sites32``) what each site beyond the 8-site run's costs the server process."""
    by_name = {r["experiment"]: r for r in results}
    rows = []
    for r in results:
        row = {k: v for k, v in r.items() if k not in ("samples", "peak_by_process_mib")}
        row["leftover_processes"] = len(r["leftover_processes"])
        row["stray_files"] = len(r["stray_files"])
        row["server_peak_mib"] = process_peaks(r["samples"]).get(SERVER_PROCESS, 0.0)
        row["peak_mib_per_site"] = round(r["peak_rss_mib"] / r["sites"], 1)
        if r["experiment"] == "sites32" and "soak" in by_name:
            base = by_name["soak"]
            extra = r["sites"] - base["sites"]
            growth = row["server_peak_mib"] - process_peaks(base["samples"]).get(SERVER_PROCESS, 0.0)
            row["server_mib_per_extra_site"] = round(growth / extra, 2)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/scale.json")
    parser.add_argument("--runs", default="runs/scale", help="the runs' folders")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out)
    results: list[dict[str, Any]] = json.loads(out.read_text())["experiments"] if out.exists() else []
    for name in args.experiments.split(","):
        if name in {r["experiment"] for r in results}:
            continue
        log.info("experiment %s", name)
        results.append(run_experiment(name, Path(args.runs)))
        payload = {"benchmark": "scale", "machine": machine(), "settings": COMMON, "experiments": results}
        write_json(out, payload)
    rows = summarise(results)
    columns = [
        "experiment", "sites", "rounds", "seconds", "peak_rss_mib", "peak_mib_per_site", "server_peak_mib",
        "server_mib_per_extra_site", "rss_after_warmup_mib", "rss_at_end_mib", "rss_growth", "server_rss_growth", "flat",
        "leftover_processes", "stray_files",
    ]  # fmt: skip
    text = table([{c: r.get(c, "") for c in columns} for r in rows], columns)
    out.with_suffix(".md").write_text(text + "\n")
    log.info("\n%s", text)


if __name__ == "__main__":
    main()
