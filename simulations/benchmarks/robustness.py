"""One hostile site among two, three or four: the final Dice of the federation under each attack and strategy.

The last site attacks in every round of both phases (``federation.inject``, amlp_core/faults.py):
``poison`` (its update scaled x100), ``scale8`` (scaled x8: under the norm bound of 10), ``flip``
(sign-flipped), ``nan`` (one NaN weight) or ``inflate`` (``num-examples`` = 1e9). Each strategy runs with
the server's reply checks, norm clipping and weight cap (server/validation.py), which every run has. A
row's Dice is the last evaluation round's, over all the sites' test cases (the attacker's included: it is
the model everyone gets).

    python -m simulations.benchmarks.robustness --sites 2,3,4 --strategies fedavg --out results/robustness.json

Resumable: rows already in ``--out`` are kept. Phantoms, a small 2D network, one seed: a check that
the attacks change nothing that matters, not a study of robust aggregation.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from amlp_core import protocol as P
from amlp_core.config import build_config
from amlp_core.logs import setup_logging
from server.results import RunRecord
from server.validation import CLIPPED
from simulations.benchmarks.common import SMALL_FEDERATION, machine, table, write_json
from simulations.simulate import simulate

log = logging.getLogger(__name__)
ATTACKS = ("none", "poison", "scale8", "flip", "nan", "inflate")
SPECS = {"scale8": "poison=8"}  # attacks that are another attack's kind with a value
STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg")
SETTINGS: dict[str, Any] = {
    **SMALL_FEDERATION,
    "federation.sites": 4,
    "federation.pretrain_rounds": 2,
    "federation.finetune_rounds": 6,
    "federation.finetune_local_steps": 20,
    "federation.local_epochs": 1,
    "federation.trim_beta": 0.25,  # one of four sites cut at each end
}


def run_one(strategy: str, attack: str, seed: int, runs: Path, sites: int = 4) -> dict[str, Any]:
    """One federation of ``sites``; its final Dice and how many of the attacker's replies the server rejected
    or clipped."""
    attacker = f"site{sites - 1}"
    run_dir = runs / f"{sites}sites-{strategy}-{attack}-s{seed}"
    overrides = {
        **SETTINGS,
        "federation.sites": sites,
        "federation.min_sites": max(1, sites - 1),  # the honest sites go on without the attacker's reply
        "federation.strategy": strategy,
        "federation.run_dir": str(run_dir),
        "federation.inject": "" if attack == "none" else f"{attacker}:{SPECS.get(attack, attack)}",
        "train.seed": seed,
    }
    started = time.monotonic()
    simulate(build_config(overrides), timeout=3600, overwrite=True)  # a row not in --out yet starts over
    record = RunRecord.read(run_dir)
    final = record.final_evaluation()
    assert final is not None, f"{run_dir}: the federation ended without an evaluation"
    replies = record.select(site=attacker, kind=P.TRAIN)
    return {
        "sites": sites,
        "strategy": strategy,
        "attack": attack,
        "seed": seed,
        "dice_mean": final.number("dice_mean"),
        "attacker_rejected": sum(r.status == P.REJECTED for r in replies),
        "attacker_clipped": sum(r.get(CLIPPED) is not None for r in replies),
        "attacker_rounds": len(replies),
        "seconds": round(time.monotonic() - started, 1),
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with its Dice minus the clean run of the same strategy and seed."""
    clean = {(r.get("sites", 4), r["strategy"], r["seed"]): r["dice_mean"] for r in rows if r["attack"] == "none"}
    out = []
    for r in rows:
        base = clean.get((r.get("sites", 4), r["strategy"], r["seed"]))
        delta = None if base is None else r["dice_mean"] - base
        out.append({**r, "minus_clean": delta, "within_0.01": None if delta is None else abs(delta) <= 0.01})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/robustness.json")
    parser.add_argument("--runs", default="runs/robustness", help="the runs' folders")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sites", default="4", help="federation sizes, e.g. 2,3,4 (the last site attacks)")
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r.get("sites", 4), r["strategy"], r["attack"], r["seed"]) for r in rows}
    for sites in (int(n) for n in args.sites.split(",")):
        for strategy in args.strategies.split(","):
            for attack in args.attacks.split(","):
                if (sites, strategy, attack, args.seed) in done:
                    continue
                log.info("%d sites, %s under %s", sites, strategy, attack)
                rows.append(run_one(strategy, attack, args.seed, Path(args.runs), sites))
                payload = {"benchmark": "robustness", "machine": machine(), "settings": SETTINGS, "rows": rows}
                write_json(out, payload)
    summary = summarise(rows)
    write_json(out, {"benchmark": "robustness", "machine": machine(), "settings": SETTINGS, "rows": summary})
    columns = ["sites", "strategy", "attack", "dice_mean", "minus_clean", "attacker_rejected", "attacker_clipped"]
    columns += ["attacker_rounds", "seconds"]
    text = table(summary, columns)
    out.with_suffix(".md").write_text(text + "\n")
    log.info("\n%s", text)


if __name__ == "__main__":
    main()
