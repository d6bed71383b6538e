"""Real-data result at one site: pretrain on the hippocampus training cases, fine-tune with
100 % and 10 % of their labels, Dice per class on the fixed test split (and from scratch for
reference). Prints a table and writes JSON.

    python -m simulations.benchmarks.hippocampus --method amlp --pretrain-epochs 60 \
        --finetune-steps 400 --scratch 0.1 --out results/hippocampus.json

Budgets are in epochs and steps, not wall time, so that other load on the machine does not
change the result; the wall time of each part is reported beside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from amlp_core.config import build_config
from amlp_core.engine.checkpoint import load_checkpoint
from amlp_core.engine.pipeline import CHECKPOINT, METRICS, data_defaults, finetune, load_split, pretrain
from amlp_core.errors import CheckpointError
from simulations.benchmarks.common import (HIPPOCAMPUS_SPLIT, benchmark_parser, machine, set_overrides, table,
                                           write_json)

log = logging.getLogger(__name__)


def _finished(run: Path, cfg) -> bool:
    """A pretraining run in ``run`` that completed ``cfg``'s epochs with ``cfg``'s settings."""
    try:
        _, meta = load_checkpoint(run / CHECKPOINT)
    except CheckpointError:
        return False
    return meta.get("epoch") == cfg.train.epochs and meta.get("config") == cfg.to_dict()


def main() -> None:
    p = benchmark_parser(__doc__, "results/hippocampus.json")
    p.add_argument("--pretrain-epochs", type=int, default=100)
    p.add_argument("--finetune-steps", type=int, default=800, help="optimiser steps of each fine-tuning run")
    p.add_argument("--fractions", default="1.0,0.1")
    p.add_argument("--scratch", default="", help="label fractions at which to also fine-tune from scratch, e.g. 0.1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--runs", default="runs/hippocampus")
    args = p.parse_args()

    cfg = build_config({**data_defaults(args.data), **HIPPOCAMPUS_SPLIT, "method.name": args.method,
                        "train.seed": args.seed, "train.num_threads": args.threads, **set_overrides(args.set)})
    split = load_split(cfg)
    pre_cfg = cfg.replace(train={"epochs": args.pretrain_epochs})
    pre_dir = Path(f"{args.runs}/pretrain_{args.method}")
    if _finished(pre_dir, pre_cfg):
        pre = json.loads((pre_dir / METRICS).read_text().splitlines()[-1])
        log.info("reusing the finished pretraining in %s", pre_dir)
    else:
        pre = pretrain(pre_cfg, pre_dir, split)
    pretrain_seconds = pre["seconds"]
    log.info("pretraining took %.0f s", pretrain_seconds)

    header = {"benchmark": "hippocampus", "machine": machine(), "split": HIPPOCAMPUS_SPLIT,
              "train_cases": len(split.train), "test_cases": len(split.test), "method": args.method,
              "pretrain_epochs": pre["epoch"], "pretrain_seconds": round(pretrain_seconds, 1), "pretrain_final": pre,
              "finetune_steps": args.finetune_steps}
    rows = []
    scratch = {float(f) for f in args.scratch.split(",") if f}
    for fraction in [float(f) for f in args.fractions.split(",")]:
        inits = [(args.method, pre_dir)] + ([("scratch", None)] if fraction in scratch else [])
        for name, init in inits:
            batches = max(1, round(fraction * len(split.train)) // cfg.train.batch_size)
            ft_cfg = cfg.replace(train={"epochs": max(1, args.finetune_steps // batches), "label_fraction": fraction})
            result = finetune(ft_cfg, f"{args.runs}/finetune_{name}_{fraction}", init=init, split=split)
            rows.append({"init": name, "label_fraction": fraction, "labelled_cases": result["labelled_cases"],
                         "epochs": result["epochs"], "train_seconds": result["train_seconds"],
                         "dice_anterior": result["dice_1"], "dice_posterior": result["dice_2"],
                         "dice_mean": result["dice_mean"]})
            log.info("%s, %.0f %% labels: %s", name, 100 * fraction, rows[-1])
            write_json(args.out, {**header, "rows": rows})  # after every row
    print(table(rows, ["init", "label_fraction", "labelled_cases", "epochs", "train_seconds", "dice_anterior",
                       "dice_posterior", "dice_mean"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
