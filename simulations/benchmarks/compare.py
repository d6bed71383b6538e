"""The method comparison table: federated pretraining against scratch and a plain U-Net, at several label fractions.

For every seed and every pretraining method (mae, mps_ams, amlp, ahm, ace) one federated run
(``--sites`` simulated hospitals, the training cases dealt IID) pretrains for
``--pretrain-rounds`` rounds and fine-tunes for ``--finetune-rounds`` rounds with the largest
label fraction (100 % by default); its aggregated encoder (``RUN_DIR/encoder``) is then
fine-tuned alone (``federation.init_encoder``, no pretraining rounds) with each smaller
fraction. ``scratch`` fine-tunes a freshly initialised encoder (no pretraining) with each
fraction; ``unet`` does the same with a plain conv U-Net (``model.seg_arch=unet``, no encoder:
the floor to beat of DESIGN.md section 6). Every run has the same fine-tuning budget in
optimiser steps: a run with a smaller fraction f trains ``local_epochs x largest / f`` local
epochs per round (rounded), so a site takes about as many steps per round over its few
labelled cases as over all of them. Seeds change ``train.seed`` (model
initialisation, masks, sampling, the labelled subset), never the test split, which is fixed
before any result is seen (48 of the 208 hippocampus cases, ``data.split_seed=0``).

Reported per cell (method x label fraction): the Dice of every class (on the hippocampus
``dice_1`` = anterior, ``dice_2`` = posterior) and their mean, averaged over the test cases of
all sites, as mean and standard deviation over the seeds, and the wall seconds per run. The JSON
(every run's row, the aggregated table, the machine and the budget) is rewritten after every
run, so an interrupted table continues with ``--resume-rows``. A Markdown table (same stem,
``.md``) and a grouped bar plot (same stem, ``.svg``, matplotlib) go
next to it. Without CUDA the result is labelled a reduced budget.

    python -m simulations.benchmarks.compare --out results/compare.json --resume-rows    # the table (GPU)
    python -m simulations.benchmarks.compare --pretrain-rounds 10 --finetune-rounds 4 --local-epochs 1 \\
        --set train.batch_size=2 --out results/compare.json --resume-rows          # reduced budget (CPU)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from server.federation import ENCODER_DIR
from simulations.benchmarks.common import (
    machine,
    setup_logging,
    write_json,
)
from simulations.benchmarks.comparison.plan import (
    SCRATCH_LIKE,
    base_config,
    budget_of,
    encoder_change,
    parse_args,
    pct,
    run_config,
    run_name,
    run_once,
)
from simulations.benchmarks.comparison.plot import save_plot
from simulations.benchmarks.comparison.report import markdown
from simulations.benchmarks.comparison.stats import aggregate

log = logging.getLogger(__name__)


def _load_earlier(path: Path, budget: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The rows and class names of an earlier invocation with the same budget (--resume-rows)."""
    if not path.exists():
        return [], {}
    old = json.loads(path.read_text())
    if old.get("budget") != budget:
        raise SystemExit(
            f"{path} was made with another budget ({old.get('budget')}); use another --out, or the same budget"
        )
    rows = old.get("rows", [])
    log.info("--resume-rows: %d runs already in %s", len(rows), path)
    return rows, old.get("class_names", {})


def write_outputs(out: Path, payload: dict[str, Any]) -> str:
    """JSON, then the Markdown table and the SVG plot next to it; returns the Markdown."""
    write_json(out, payload)
    md = markdown(payload)
    out.with_suffix(".md").write_text(md)
    b = payload["budget"]
    subtitle = (
        f"{b['sites']} sites, {b['pretrain_rounds']} + {b['finetune_rounds']} rounds x {b['local_epochs']} "
        f"local epochs, {len(payload['seeds'])} seed(s)"
        + ("; reduced budget (CPU)" if payload.get("reduced_budget") else "")
    )
    save_plot(payload["table"], out.with_suffix(".svg"), f"Mean Dice on {b['data']}, mean ± std over seeds", subtitle)
    return md


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or continue) the table; returns the payload written to ``--out``."""
    setup_logging()
    args = parse_args(argv)
    runs, out = Path(args.runs).resolve(), Path(args.out)
    budget, base = budget_of(args), base_config(args)
    seeds = list(range(args.seeds))
    rows, class_names = _load_earlier(out, budget) if args.resume_rows else ([], {})
    for row in rows:  # rows from before the measure existed
        if row.get("pretrain_rounds") and "encoder_change" not in row:
            row["encoder_change"] = encoder_change(row["run_dir"])
    pretrained = [m for m in args.methods if m not in SCRATCH_LIKE]
    largest = max(args.fractions)
    total = len(seeds) * len(args.methods) * len(args.fractions)
    reduced = None
    if not torch.cuda.is_available():
        reduced = (
            f"reduced budget on CPU ({torch.get_num_threads()} threads): {args.pretrain_rounds} pretraining "
            f"and {args.finetune_rounds} fine-tuning rounds of {args.local_epochs} local epochs, not the "
            "full table"
        )
    payload: dict[str, Any] = {
        "benchmark": "compare",
        "machine": machine(),
        "budget": budget,
        "seeds": seeds,
        "methods": args.methods,
        "fractions": args.fractions,
        "reduced_budget": reduced,
        "class_names": class_names,
        "rows": rows,
        "table": [],
    }
    log.info(
        "method comparison: %d cells x %d seeds = %d federated runs, %d sites; runs in %s; results in %s",
        len(args.methods) * len(args.fractions),
        len(seeds),
        total,
        args.sites,
        runs,
        out,
    )

    def done(method: str, fraction: float, seed: int) -> bool:
        return any(r["method"] == method and r["label_fraction"] == fraction and r["seed"] == seed for r in rows)

    def record(
        method: str,
        fraction: float,
        seed: int,
        init: str,
        pretrain_rounds: int,
        result: dict[str, Any],
        names: dict[str, str],
        run_dir: Path,
    ) -> None:
        rows[:] = [
            r for r in rows if not (r["method"] == method and r["label_fraction"] == fraction and r["seed"] == seed)
        ]
        rows.append(
            {
                "seed": seed,
                "method": method,
                "label_fraction": fraction,
                "init": init,
                "pretrain_rounds": pretrain_rounds,
                **result,
                "run_dir": str(run_dir),
                "encoder_change": encoder_change(run_dir) if pretrain_rounds else None,
            }
        )
        payload["class_names"] = payload["class_names"] or names
        payload["table"] = aggregate(rows, args.methods, args.fractions)
        write_outputs(out, payload)

    count = 0
    for seed in seeds:
        for method in args.methods:
            # The largest fraction first: for a pretraining method, that run also makes the encoder.
            for fraction in sorted(args.fractions, reverse=True):
                count += 1
                label = f"run {count}/{total}: seed {seed}, {method}, {pct(fraction)} labels"
                run_dir = runs / run_name(method, fraction, seed)
                encoder = runs / run_name(method, largest, seed) / ENCODER_DIR
                needs_encoder = method in pretrained and fraction < largest
                if done(method, fraction, seed):
                    log.info("%s: already in %s, skipped", label, out)
                    continue
                if method in SCRATCH_LIKE:
                    init, pre_rounds, init_encoder = "scratch", 0, ""
                elif not needs_encoder:
                    init, pre_rounds, init_encoder = "federated pretraining", args.pretrain_rounds, ""
                else:
                    init, pre_rounds, init_encoder = "pretrained encoder", 0, str(encoder)
                    if not (encoder / "checkpoint.pt").exists():  # its run is in --out but its folder is gone
                        log.warning("%s: the encoder %s is missing: pretraining again", label, encoder)
                        big_dir = runs / run_name(method, largest, seed)
                        cfg = run_config(base, big_dir, method, largest, seed, args.pretrain_rounds)
                        result, names = run_once(cfg, args, f"{label} (pretraining, {pct(largest)} labels)")
                        record(
                            method,
                            largest,
                            seed,
                            "federated pretraining",
                            args.pretrain_rounds,
                            {**result, "local_epochs": args.local_epochs},
                            names,
                            big_dir,
                        )
                # Fine-tuning is counted in steps (federation.finetune_local_steps): every fraction gets the same.
                epochs = args.local_epochs
                cfg = run_config(base, run_dir, method, fraction, seed, pre_rounds, init_encoder, epochs)
                result, names = run_once(cfg, args, label)
                record(method, fraction, seed, init, pre_rounds, {**result, "local_epochs": epochs}, names, run_dir)
    payload["table"] = aggregate(rows, args.methods, args.fractions)
    md = write_outputs(out, payload)
    log.info("wrote %s, %s and %s", out, out.with_suffix(".md"), out.with_suffix(".svg"))
    print(md)
    return payload


if __name__ == "__main__":
    main()
