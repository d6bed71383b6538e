"""The method comparison table: federated pretraining against scratch and a plain U-Net, at several label fractions.

For every seed and every pretraining method (mae, mps_ams, amlp, ahm, ace) one federated run
(``--sites`` simulated hospitals, the training cases dealt IID, or by ``--partition``: ``dirichlet`` for
sites of unequal size, ``category`` for sites skewed by class, e.g. BUSI's benign / malignant / normal) pretrains for
``--pretrain-rounds`` rounds and fine-tunes for ``--finetune-rounds`` rounds with the largest
label fraction (100 % by default); its aggregated encoder (``RUN_DIR/encoder``) is then
fine-tuned alone (``federation.init_encoder``, no pretraining rounds) with each smaller
fraction. ``scratch`` fine-tunes a freshly initialised encoder (no pretraining) with each
fraction; ``unet`` does the same with a plain conv U-Net (``model.seg_arch=unet``, no encoder:
the floor to beat of docs/results.md, how results are measured). Every run has the same fine-tuning budget in
optimiser steps: a run with a smaller fraction f trains ``local_epochs x largest / f`` local
epochs per round (rounded), so a site takes about as many steps per round over its few
labelled cases as over all of them. ``--semi none,mean_teacher`` adds, for every method, a row
``"<method> + mean_teacher"`` that fine-tunes from the same start with the site's unlabelled cases in the
loss (``train.semi_supervised``), paired with its supervised row and, from a pretrained start, with
``scratch + mean_teacher`` (issue 27's federated rows). Seeds change ``train.seed`` (model
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from amlp_core.plots import save_plot
from server.federation import ENCODER_DIR
from simulations.benchmarks.common import (
    machine,
    setup_logging,
    write_json,
)
from simulations.benchmarks.comparison.plan import (
    SCRATCH_LIKE,
    SUPERVISED,
    base_config,
    budget_of,
    encoder_change,
    parse_args,
    pct,
    run_config,
    run_name,
    run_once,
    split_semi,
)
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


@dataclass
class _Table:
    """The rows so far and the payload that holds them; written to ``out`` after every run."""

    args: Any
    out: Path
    payload: dict[str, Any]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.payload["rows"]

    def done(self, method: str, fraction: float, seed: int) -> bool:
        return any(r["method"] == method and r["label_fraction"] == fraction and r["seed"] == seed for r in self.rows)

    def record(
        self,
        cell: tuple[str, float, int],
        init: str,
        pretrain_rounds: int,
        result: dict[str, Any],
        names: dict[str, str],
        run_dir: Path,
    ) -> None:
        """Replace the row of ``cell`` (method, fraction, seed) and write everything."""
        method, fraction, seed = cell
        self.payload["rows"] = [r for r in self.rows if (r["method"], r["label_fraction"], r["seed"]) != cell]
        self.rows.append(
            {
                "seed": seed,
                "method": method,
                "label_fraction": fraction,
                "semi_supervised": split_semi(method)[1],
                "init": init,
                "pretrain_rounds": pretrain_rounds,
                **result,
                "local_epochs": self.args.local_epochs,
                "run_dir": str(run_dir),
                "encoder_change": encoder_change(run_dir) if pretrain_rounds else None,
            }
        )
        self.payload["class_names"] = self.payload["class_names"] or names
        self.payload["table"] = aggregate(self.rows, self.args.methods, self.args.fractions)
        write_outputs(self.out, self.payload)


def _payload(args, budget: dict[str, Any], rows: list[dict[str, Any]], class_names: dict[str, str]) -> dict[str, Any]:
    reduced = None
    if not torch.cuda.is_available():
        reduced = (
            f"reduced budget on CPU ({torch.get_num_threads()} threads): {args.pretrain_rounds} pretraining "
            f"and {args.finetune_rounds} fine-tuning rounds of {args.local_epochs} local epochs, not the "
            "full table"
        )
    return {
        "benchmark": "compare",
        "machine": machine(),
        "budget": budget,
        "seeds": list(range(args.seeds)),
        "methods": args.methods,
        "fractions": args.fractions,
        "reduced_budget": reduced,
        "class_names": class_names,
        "rows": rows,
        "table": [],
    }


def _start_of(cell: tuple[str, float, int], table: _Table, base, runs: Path, label: str) -> tuple[str, int, str]:
    """How the run of ``cell`` starts: ``(init, pretraining rounds, initial encoder)``. A pretraining method
    pretrains in its largest-fraction run and fine-tunes the smaller fractions from that run's encoder
    (made again when its folder is gone); its semi-supervised rows fine-tune from that encoder at every
    fraction, so that they differ from the supervised rows in the fine-tuning loss alone."""
    row, fraction, seed = cell
    method, semi = split_semi(row)
    args, largest = table.args, max(table.args.fractions)
    if method in SCRATCH_LIKE:
        return "scratch", 0, ""
    if fraction == largest and semi == SUPERVISED:
        return "federated pretraining", args.pretrain_rounds, ""
    encoder = runs / run_name(method, largest, seed) / ENCODER_DIR
    if not (encoder / "checkpoint.pt").exists():  # its run is not made yet, or its folder is gone
        log.warning("%s: the encoder %s is missing: pretraining it", label, encoder)
        big_dir = runs / run_name(method, largest, seed)
        cfg = run_config(base, big_dir, method, largest, seed, args.pretrain_rounds)
        result, names = run_once(cfg, args, f"{label} (pretraining, {pct(largest)} labels)")
        table.record((method, largest, seed), "federated pretraining", args.pretrain_rounds, result, names, big_dir)
    return "pretrained encoder", 0, str(encoder)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or continue) the table; returns the payload written to ``--out``."""
    setup_logging()
    args = parse_args(argv)
    runs, out = Path(args.runs).resolve(), Path(args.out)
    budget, base = budget_of(args), base_config(args)
    rows, class_names = _load_earlier(out, budget) if args.resume_rows else ([], {})
    for row in rows:  # rows from before the measure existed
        if row.get("pretrain_rounds") and "encoder_change" not in row:
            row["encoder_change"] = encoder_change(row["run_dir"])
    table = _Table(args, out, _payload(args, budget, rows, class_names))
    total = args.seeds * len(args.methods) * len(args.fractions)
    log.info(
        "method comparison: %d cells x %d seeds = %d federated runs, %d sites; runs in %s; results in %s",
        len(args.methods) * len(args.fractions),
        args.seeds,
        total,
        args.sites,
        runs,
        out,
    )
    count = 0
    for seed in range(args.seeds):
        for method in args.methods:
            # The largest fraction first: for a pretraining method, that run also makes the encoder.
            for fraction in sorted(args.fractions, reverse=True):
                count += 1
                label = f"run {count}/{total}: seed {seed}, {method}, {pct(fraction)} labels"
                if table.done(method, fraction, seed):
                    log.info("%s: already in %s, skipped", label, out)
                    continue
                cell = (method, fraction, seed)
                init, pre_rounds, init_encoder = _start_of(cell, table, base, runs, label)
                # Fine-tuning is counted in steps (federation.finetune_local_steps): every fraction gets the same.
                run_dir = runs / run_name(method, fraction, seed)
                cfg = run_config(base, run_dir, method, fraction, seed, pre_rounds, init_encoder, args.local_epochs)
                result, names = run_once(cfg, args, label)
                table.record(cell, init, pre_rounds, result, names, run_dir)
    table.payload["table"] = aggregate(table.rows, args.methods, args.fractions)
    md = write_outputs(out, table.payload)
    log.info("wrote %s, %s and %s", out, out.with_suffix(".md"), out.with_suffix(".svg"))
    print(md)
    return table.payload


if __name__ == "__main__":
    main()
