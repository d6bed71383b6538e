"""Dice with and without record-level DP (Opacus DP-SGD) on the hippocampus data, one site.

The site fine-tunes the segmentation network on its labelled training cases (the fixed
160/48 split) for the same number of epochs without DP and with DP at each budget; the
noise multiplier is calibrated so that the planned epochs spend exactly the budget (RDP
accountant, delta 1e-5, per-case clipping at ``privacy.max_grad_norm``). The encoder may
start from a pretraining run (``--init``: pretraining on unlabelled scans is outside the
private fine-tuning here). Prints a table and writes JSON after every row.

    python -m simulations.benchmarks.privacy --epochs 10 --budgets none,8,3 \
        --init runs/hippocampus/pretrain_amlp --out results/privacy.json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from amlp_core.config import build_config
from amlp_core.engine.pipeline import finetune
from amlp_core.engine.split import data_defaults, load_split
from simulations.benchmarks.common import HIPPOCAMPUS_SPLIT, benchmark_parser, machine, set_overrides, table, write_json

log = logging.getLogger(__name__)
COLUMNS = ["budget", "epsilon", "noise_multiplier", "epochs", "train_seconds"]


def main() -> None:
    p = benchmark_parser(__doc__, "results/privacy.json")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--budgets", default="none,8,3", help="comma-separated epsilons; 'none' = without DP")
    p.add_argument("--label-fraction", type=float, default=1.0)
    p.add_argument("--init", default="", help="pretraining run whose encoder starts fine-tuning (default: scratch)")
    p.add_argument("--runs", default="runs/privacy")
    args = p.parse_args()

    cfg = build_config(
        {
            **data_defaults(args.data),
            **HIPPOCAMPUS_SPLIT,
            "train.epochs": args.epochs,
            "train.label_fraction": args.label_fraction,
            **set_overrides(args.set),
        }
    )
    split = load_split(cfg)
    header = {
        "benchmark": "privacy",
        "machine": machine(),
        "split": HIPPOCAMPUS_SPLIT,
        "epochs": args.epochs,
        "train_cases": len(split.train),
        "test_cases": len(split.test),
        "init": args.init or "scratch",
        "delta": cfg.privacy.delta,
        "max_grad_norm": cfg.privacy.max_grad_norm,
        "batch_size": cfg.train.batch_size,
    }
    rows = []
    for budget in args.budgets.split(","):
        private = budget != "none"
        run_cfg = cfg.replace(privacy={"site_dp": private, **({"budget": float(budget)} if private else {})})
        out = Path(args.runs) / f"budget_{budget}"
        if (out / "privacy_ledger.json").exists():
            (out / "privacy_ledger.json").unlink()  # a benchmark re-run starts a fresh ledger for its own output
        result = finetune(run_cfg, out, init=args.init or None, split=split)
        noise = None
        if private:
            noise = json.loads((out / "privacy_ledger.json").read_text())["noise_multiplier"]
        rows.append(
            {
                "budget": budget,
                "epsilon": result.get("epsilon"),
                "noise_multiplier": noise,
                "epochs": result["epochs"],
                "train_seconds": result["train_seconds"],
                **{k: v for k, v in result.items() if k.startswith("dice_")},
            }
        )  # per class (1 = anterior, 2 = posterior), mean
        log.info("budget %s: %s", budget, rows[-1])
        write_json(args.out, {**header, "rows": rows})
    print(table(rows, COLUMNS + sorted(k for k in rows[0] if k.startswith("dice_"))))


if __name__ == "__main__":
    main()
