"""Real-data result at one site: pretrain on the hippocampus training cases, fine-tune with
100 % and 10 % of their labels, Dice per class on the fixed test split (and from scratch for
reference). Prints a table and writes JSON.

    python -m simulations.benchmarks.hippocampus --method amlp --pretrain-epochs 60 \
        --finetune-steps 800 --scratch --out results/hippocampus.json

Budgets are in epochs and steps, not wall time, so that other load on the machine does not
change the result; the wall time of each part is reported beside it.
"""

from __future__ import annotations

import logging
import time

from amlp_core.config import build_config
from amlp_core.engine.pipeline import data_defaults, finetune, load_split, pretrain
from simulations.benchmarks.common import HIPPOCAMPUS_SPLIT, benchmark_parser, machine, table, write_json

log = logging.getLogger(__name__)


def main() -> None:
    p = benchmark_parser(__doc__, "results/hippocampus.json")
    p.add_argument("--pretrain-epochs", type=int, default=100)
    p.add_argument("--finetune-steps", type=int, default=800, help="optimiser steps of each fine-tuning run")
    p.add_argument("--fractions", default="1.0,0.1")
    p.add_argument("--scratch", action="store_true", help="also fine-tune from scratch for reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--runs", default="runs/hippocampus")
    args = p.parse_args()

    cfg = build_config({**data_defaults(args.data), **HIPPOCAMPUS_SPLIT, "method.name": args.method,
                        "train.seed": args.seed, "train.num_threads": args.threads})
    split = load_split(cfg)
    start = time.monotonic()
    pre_cfg = cfg.replace(train={"epochs": args.pretrain_epochs})
    pre = pretrain(pre_cfg, f"{args.runs}/pretrain_{args.method}", split)
    pretrain_seconds = time.monotonic() - start
    log.info("pretraining took %.0f s", pretrain_seconds)

    rows = []
    inits = [(args.method, f"{args.runs}/pretrain_{args.method}")] + ([("scratch", None)] if args.scratch else [])
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for name, init in inits:
            batches = max(1, round(fraction * len(split.train)) // cfg.train.batch_size)
            ft_cfg = cfg.replace(train={"epochs": max(1, args.finetune_steps // batches), "label_fraction": fraction})
            result = finetune(ft_cfg, f"{args.runs}/finetune_{name}_{fraction}", init=init, split=split)
            rows.append({"init": name, "label_fraction": fraction, "labelled_cases": result["labelled_cases"],
                         "epochs": result["epochs"], "train_seconds": result["train_seconds"],
                         "dice_anterior": result["dice_1"], "dice_posterior": result["dice_2"],
                         "dice_mean": result["dice_mean"]})
            log.info("%s, %.0f %% labels: %s", name, 100 * fraction, rows[-1])
    print(table(rows, ["init", "label_fraction", "labelled_cases", "epochs", "train_seconds", "dice_anterior",
                       "dice_posterior", "dice_mean"]))
    payload = {"benchmark": "hippocampus", "machine": machine(), "split": HIPPOCAMPUS_SPLIT,
               "train_cases": len(split.train), "test_cases": len(split.test), "method": args.method,
               "pretrain_epochs": pre["epoch"], "pretrain_seconds": round(pretrain_seconds, 1),
               "pretrain_final": pre, "finetune_steps": args.finetune_steps, "rows": rows,
               "total_seconds": round(time.monotonic() - start, 1)}
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
