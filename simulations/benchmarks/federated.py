"""Federated against centralized training of the same method and budget, on the hippocampus data.

The federation: ``--sites`` simulated hospitals (the 160 training cases cut IID), the two
phases run by Flower's simulation engine. The centralized run: the same method, model and
seeds on all 160 cases, for the same number of epochs over the data (rounds x local epochs).
Both are tested on the same 48 fixed test cases. Reports the Dice ratio (target >= 0.98),
the wall-time overhead of the federation without its fixed start-up (target <= 1.25x), the
start-up itself, and the bytes each site sends and receives per round. Prints a table and
writes JSON.

    python -m simulations.benchmarks.federated --out results/federated.json
    python -m simulations.benchmarks.federated --set train.seed=1 --runs runs/federated_s1 --out results/federated_s1.json
    python -m simulations.benchmarks.federated --combine results/federated.json results/federated_s1.json \
        --out results/federated_seeds.json    # mean and spread over the seeds' runs
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amlp_core import protocol as P
from amlp_core.config import Config, build_config, load_config
from amlp_core.engine.pipeline import finetune, pretrain
from amlp_core.engine.split import data_defaults, load_split
from server.results import RunRecord
from simulations.benchmarks.common import (
    HIPPOCAMPUS_SPLIT,
    benchmark_parser,
    machine,
    mean_std,
    set_overrides,
    table,
    write_json,
)
from simulations.simulate import default_run_config, simulate

log = logging.getLogger(__name__)
#: What must be equal in runs combined over seeds.
BUDGET_KEYS = (
    "sites",
    "method",
    "pretrain_rounds",
    "finetune_rounds",
    "local_epochs",
    "label_fraction",
    "central_batch_size",
    "site_batch_size",
)


def combine(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Mean and spread over seeds of earlier runs of this benchmark: one JSON per seed, the same budget.

    Returns the per-run Dice and ratios, the mean and standard deviation of each, and the ratio of
    the mean Dice (federated over centralized), which is what the target is checked against.

    Raises:
        SystemExit: a file is missing, or the files were made with different budgets.
    """
    runs = []
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"--combine: {path} does not exist")
        runs.append(json.loads(Path(path).read_text()))
    budgets = [{k: r.get(k) for k in BUDGET_KEYS} for r in runs]
    if any(b != budgets[0] for b in budgets):
        raise SystemExit(
            "--combine: the files were made with different budgets: "
            + "; ".join(f"{p}: {b}" for p, b in zip(paths, budgets))
        )
    per_run = [
        {
            "file": str(p),
            "seed": r.get("seed", ""),
            "centralized": r["centralized_dice"]["dice_mean"],
            "federated": r["federated_dice"]["dice_mean"],
            "ratio": r["dice_ratio"],
        }
        for p, r in zip(paths, runs)
    ]
    out: dict[str, Any] = {
        "benchmark": "federated_seeds",
        "machine": runs[0]["machine"],
        "budget": budgets[0],
        "runs": per_run,
    }
    for key in ("centralized", "federated", "ratio"):
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std([r[key] for r in per_run])
    out["ratio_of_means"] = out["federated_mean"] / out["centralized_mean"]
    return out


def _parser():
    p = benchmark_parser(__doc__, "results/federated.json")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--pretrain-rounds", type=int, default=4)
    p.add_argument("--finetune-rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--label-fraction", type=float, default=1.0)
    p.add_argument(
        "--site-batch-size",
        type=int,
        default=0,
        help="each site's batch (default: the centralized batch); batch / sites makes one round of "
        "averaged local steps see as many cases per step as one centralized step",
    )
    p.add_argument(
        "--reuse-central",
        action="store_true",
        help="take the centralized result from an earlier run in --runs with the same settings",
    )
    p.add_argument("--runs", default="runs/federated_bench")
    p.add_argument(
        "--combine", nargs="+", metavar="JSON", help="combine earlier runs (one per seed) instead of running"
    )
    return p


def _print_combined(result: dict[str, Any]) -> None:
    stats = [
        {
            "file": name,
            **{k: result[f"{k}_{name}"] for k in ("centralized", "federated")},
            "ratio": result[f"ratio_{name}"],
        }
        for name in ("mean", "std")
    ]
    print(table([*result["runs"], *stats], ["file", "seed", "centralized", "federated", "ratio"]))
    print(f"ratio of the mean Dice: {result['ratio_of_means']:.4f}")


def _centralized(cfg: Config, args, runs: Path) -> tuple[dict[str, Any], Config, float]:
    """The same epochs at one site over all the training cases: its evaluation, config and seconds."""
    pre_epochs, ft_epochs = args.pretrain_rounds * args.local_epochs, args.finetune_rounds * args.local_epochs
    central_cfg = cfg.replace(train={"epochs": ft_epochs})
    done = runs / "central_finetune" / "evaluation.json"
    if args.reuse_central and done.exists() and load_config(runs / "central_finetune" / "config.yaml") == central_cfg:
        log.info("reusing the centralized result in %s", done.parent)
        seconds = float(json.loads((runs / "central_seconds.json").read_text())["seconds"])
        return json.loads(done.read_text()), central_cfg, seconds
    split = load_split(cfg)
    start = time.monotonic()
    pretrain(cfg.replace(train={"epochs": pre_epochs}), runs / "central_pretrain", split)
    central = finetune(central_cfg, runs / "central_finetune", init=runs / "central_pretrain", split=split)
    seconds = time.monotonic() - start
    (runs / "central_seconds.json").write_text(json.dumps({"seconds": seconds}))
    return central, central_cfg, seconds


def _federated(cfg: Config, runs: Path) -> tuple[dict[str, Any], dict[str, Any], float]:
    """The federation: its last evaluation row (all sites), its timings and message sizes, and seconds."""
    start = time.monotonic()
    simulate(cfg, timeout=3 * 3600, overwrite=True)  # an interrupted federated run starts over
    seconds = time.monotonic() - start
    record = RunRecord.read(runs / "federated")
    final = record.final_evaluation()
    assert final is not None, "the federation ended without an evaluation"
    round_seconds = record.round_seconds()
    sizes = {
        phase: {
            f"{key}_per_site": max(
                r.get(key) for r in record.select(phase=phase, kind=P.TRAIN, status=P.OK, aggregate=False)
            )
            for key in ("bytes_up", "bytes_down")
        }
        for phase in (P.PRETRAIN, P.FINETUNE)
    }
    timing = {"round_seconds": round_seconds, "startup_seconds": seconds - round_seconds, "bytes_per_round": sizes}
    return final.as_dict(), timing, seconds


def main() -> None:
    args = _parser().parse_args()
    if args.combine:
        result = combine(args.combine)
        _print_combined(result)
        print(f"wrote {write_json(args.out, result)}")
        return
    runs = Path(args.runs).resolve()
    overrides = {
        **default_run_config(),
        **data_defaults(args.data),
        **HIPPOCAMPUS_SPLIT,
        "method.name": args.method,
        "model.depth": 4,
        "train.label_fraction": args.label_fraction,
        "federation.sites": args.sites,
        "federation.min_sites": args.sites,
        "federation.pretrain_rounds": args.pretrain_rounds,
        "federation.finetune_rounds": args.finetune_rounds,
        "federation.local_epochs": args.local_epochs,
        "federation.run_dir": str(runs / "federated"),
        "train.device": "cpu",
        **set_overrides(args.set),
    }
    cfg = build_config(overrides)
    central, central_cfg, central_seconds = _centralized(cfg, args, runs)
    log.info("centralized: Dice %.4f in %.0f s", central["dice_mean"], central_seconds)
    if args.site_batch_size:
        cfg = cfg.replace(train={"batch_size": args.site_batch_size})
    final, timing, federated_seconds = _federated(cfg, runs)
    result = {
        "centralized_dice": {k: v for k, v in central.items() if k.startswith("dice_")},
        "federated_dice": {k: v for k, v in final.items() if k.startswith("dice_")},
        "dice_ratio": final["dice_mean"] / central["dice_mean"],
        "centralized_seconds": round(central_seconds, 1),
        "federated_seconds": round(federated_seconds, 1),
        "federated_round_seconds": round(timing["round_seconds"], 1),
        "startup_seconds": round(timing["startup_seconds"], 1),
        "overhead_without_startup": round(timing["round_seconds"] / central_seconds, 3),
        "bytes_per_round": timing["bytes_per_round"],
    }
    runs_table = [
        {"run": "centralized", "dice_mean": central["dice_mean"], "seconds": round(central_seconds, 1)},
        {
            "run": f"federated ({args.sites} sites)",
            "dice_mean": final["dice_mean"],
            "seconds": result["federated_seconds"],
        },
    ]
    print(table(runs_table, ["run", "dice_mean", "seconds"]))
    print(json.dumps(result, indent=2))
    settings = {
        "benchmark": "federated",
        "machine": machine(),
        "split": HIPPOCAMPUS_SPLIT,
        "seed": cfg.train.seed,
        "set": set_overrides(args.set),
        "sites": args.sites,
        "method": args.method,
        "pretrain_rounds": args.pretrain_rounds,
        "finetune_rounds": args.finetune_rounds,
        "local_epochs": args.local_epochs,
        "label_fraction": args.label_fraction,
        "central_batch_size": central_cfg.train.batch_size,
        "site_batch_size": cfg.train.batch_size,
    }
    print(f"wrote {write_json(args.out, {**settings, **result})}")


if __name__ == "__main__":
    main()
