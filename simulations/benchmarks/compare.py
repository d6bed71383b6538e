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
``.md``) and a grouped bar plot (same stem, ``.svg``, written by hand: no plotting library) go
next to it. Without CUDA the result is labelled a reduced budget.

    python -m simulations.benchmarks.compare --out results/compare.json --resume-rows    # the table (GPU)
    python -m simulations.benchmarks.compare --pretrain-rounds 10 --finetune-rounds 4 --local-epochs 1 \\
        --set train.batch_size=2 --out results/compare.json --resume-rows          # reduced budget (CPU)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import torch

from amlp_core.config import METHOD_NAMES, Config, build_config
from amlp_core.engine.checkpoint import load_checkpoint
from amlp_core.engine.split import data_defaults
from amlp_core.engine.weights import initial_shared_state
from fedamlp import protocol as P
from server.federation import ENCODER_DIR, MODEL_DIR
from simulations.benchmarks.common import (
    HIPPOCAMPUS,
    HIPPOCAMPUS_SPLIT,
    machine,
    mean_std,
    set_overrides,
    setup_logging,
    table,
    write_json,
)
from simulations.simulate import default_run_config, simulate

log = logging.getLogger(__name__)
SCRATCH = "scratch"
UNET = "unet"  # fine-tuned from scratch like SCRATCH, with model.seg_arch=unet (a plain conv U-Net)
#: Methods without pretraining: one fine-tuning-only run per fraction, no encoder needed.
SCRATCH_LIKE = (SCRATCH, UNET)
ALL_METHODS = (*SCRATCH_LIKE, *METHOD_NAMES)
COLORS = ("#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


# -- arguments and configuration --------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        default="hippocampus",
        help="'hippocampus' (../shared/data/msd_hippocampus, fixed split), 'synthetic', or a dataset folder",
    )
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated, 'scratch' and 'unet' included")
    p.add_argument("--fractions", default="0.1,0.25,1.0", help="label fractions, comma-separated")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (train.seed = 0 .. N-1)")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--pretrain-rounds", type=int, default=10)
    p.add_argument("--finetune-rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--cpus-per-site", type=int, default=1)
    p.add_argument(
        "--gpus-per-site",
        type=float,
        default=None,
        help="share of a GPU per site (default: 1/sites where CUDA is available, else 0)",
    )
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds one federated run may take")
    p.add_argument("--runs", default="runs/compare", help="folder of the federated runs")
    p.add_argument("--out", default="results/compare.json", help="JSON file; .md and .svg go next to it")
    p.add_argument(
        "--resume-rows",
        action="store_true",
        help="keep the runs already in --out (same budget) and run only the missing ones",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config value")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(ALL_METHODS)}")
    args.fractions = sorted({float(f) for f in args.fractions.split(",") if f.strip()})
    if not args.fractions or not all(0 < f <= 1 for f in args.fractions):
        p.error("--fractions: label fractions in (0, 1]")
    if args.seeds < 1:
        p.error("--seeds: at least 1")
    if args.pretrain_rounds < 1 and any(m not in SCRATCH_LIKE for m in args.methods):
        p.error(f"--pretrain-rounds: at least 1 for a pretraining method ({' and '.join(SCRATCH_LIKE)} need none)")
    if args.gpus_per_site is None:
        args.gpus_per_site = round(1 / args.sites, 4) if torch.cuda.is_available() else 0.0
    return args


def data_path(data: str) -> str:
    return str(HIPPOCAMPUS) if data == "hippocampus" else data


def budget_of(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides the numbers (rows made with another budget are not mixed in)."""
    return {
        "data": args.data,
        "sites": args.sites,
        "partition": "iid",
        "pretrain_rounds": args.pretrain_rounds,
        "finetune_rounds": args.finetune_rounds,
        "local_epochs": args.local_epochs,
        "fine_tuning_steps": "equal: local epochs x largest fraction / fraction",
        "split": HIPPOCAMPUS_SPLIT if args.data == "hippocampus" else "data.test_fraction / data.split_seed",
        "set": set_overrides(args.set),
    }


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    """The flat overrides every run shares: the embedded default, the data, the federation's plan."""
    path = data_path(args.data)
    return {
        **default_run_config(),
        **data_defaults(path),
        **(HIPPOCAMPUS_SPLIT if args.data == "hippocampus" else {}),
        "federation.sites": args.sites,
        "federation.min_sites": args.sites,
        "federation.partition": "iid",
        "federation.finetune_rounds": args.finetune_rounds,
        "federation.local_epochs": args.local_epochs,
        "federation.resume": False,
        "federation.stop_after_rounds": 0,
        **set_overrides(args.set),
    }


def run_config(
    base: dict[str, Any],
    run_dir: Path,
    method: str,
    fraction: float,
    seed: int,
    pretrain_rounds: int,
    init_encoder: str = "",
    local_epochs: int | None = None,
) -> Config:
    """One run's configuration; ``scratch`` and ``unet`` keep the default method, which no round uses,
    and ``unet`` sets ``model.seg_arch=unet``.

    ``local_epochs`` (when given) replaces the base's, for a fine-tuning-only run at a small fraction.
    """
    overrides = {
        **base,
        "train.label_fraction": fraction,
        "train.seed": seed,
        "federation.pretrain_rounds": pretrain_rounds,
        "federation.init_encoder": init_encoder,
        "federation.run_dir": str(run_dir),
    }
    if local_epochs is not None:
        overrides["federation.local_epochs"] = local_epochs
    if method == UNET:
        overrides["model.seg_arch"] = "unet"
    elif method != SCRATCH:
        overrides["method.name"] = method
    return build_config(overrides)


# -- one federated run -----------------------------------------------------------------------


def pct(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def run_name(method: str, fraction: float, seed: int) -> str:
    return f"seed{seed}/{method}_{fraction * 100:g}pct"


def run_once(cfg: Config, args: argparse.Namespace, label: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Simulate one federation afresh; its final Dice, cost and class names.

    Flower's output goes to ``RUN_DIR.log`` beside the run folder.
    """
    run_dir = Path(cfg.federation.run_dir)
    if run_dir.exists():  # an interrupted run of an earlier invocation: start it over
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_file = run_dir.with_name(run_dir.name + ".log")
    log.info("%s: starting (run folder %s, Flower log %s)", label, run_dir, log_file)
    start = time.monotonic()
    with open(log_file, "wb") as stream:
        simulate(
            cfg,
            timeout=args.timeout,
            stream_to=stream,
            cpus_per_site=args.cpus_per_site,
            gpus_per_site=args.gpus_per_site,
        )
    seconds = time.monotonic() - start
    rows = json.loads((run_dir / "results" / "rounds.json").read_text())["rows"]
    final = [r for r in rows if r["kind"] == "evaluate" and r["site"] == P.ALL_SITES][-1]
    last_train = [
        r
        for r in rows
        if r["kind"] == "train"
        and r["phase"] == "finetune"
        and r["site"] != P.ALL_SITES
        and r["status"] == "ok"
        and r["round"] == final["round"]
    ]

    def round_seconds(phase: str) -> float:  # the server's time in the rounds of a phase (no start-up)
        return round(sum(r["seconds"] for r in rows if r["site"] == P.ALL_SITES and r["phase"] == phase), 1)

    row = {k: v for k, v in final.items() if k.startswith("dice_")}
    row.update(
        seconds=round(seconds, 1),
        labelled_cases=sum(r.get(P.NUM_EXAMPLES, 0) for r in last_train),
        pretrain_seconds=round_seconds("pretrain"),
        finetune_seconds=round_seconds("finetune"),
    )
    _, meta = load_checkpoint(run_dir / MODEL_DIR / "checkpoint.pt")
    log.info(
        "%s: done in %.0f s, %s",
        label,
        seconds,
        ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("dice_")),
    )
    return row, dict(meta.get("class_names", {}))


def encoder_change(run_dir: str | Path) -> float | None:
    """How far federated pretraining moved the encoder: ``||w - w0|| / ||w0||`` over the encoder's
    weights (position embedding excluded: fixed sin-cos), ``w`` the aggregated encoder in
    ``RUN_DIR/encoder``, ``w0`` the initial one the server sent (seeded by ``train.seed``).
    None when the run left no encoder (scratch, unet, a fine-tuning-only run).
    """
    path = Path(run_dir) / ENCODER_DIR / "checkpoint.pt"
    if not path.exists():
        return None
    state, meta = load_checkpoint(path)
    cfg = build_config(meta["config"])
    initial = initial_shared_state(cfg)
    keys = sorted(k for k in initial if k.startswith("encoder.") and k != "encoder.pos_embed")
    w = torch.cat([state["method"][k].float().flatten() for k in keys])
    w0 = torch.cat([initial[k].float().flatten() for k in keys])
    return round(float((w - w0).norm() / w0.norm()), 5)


# -- the table -------------------------------------------------------------------------------


def dice_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``dice_1``, ``dice_2``, ... (by class index), then ``dice_mean``."""
    keys = {k for r in rows for k in r if k.startswith("dice_") and k != "dice_mean"}
    return sorted(keys, key=lambda k: int(k.split("_")[1]) if k.split("_")[1].isdigit() else 0) + ["dice_mean"]


def paired_differences(rows: Sequence[dict[str, Any]], method: str, fraction: float) -> list[float]:
    """Mean Dice of ``method`` minus that of ``scratch``, one value per seed that has both runs.

    Pairing by seed compares runs with the same labelled subset and the same fine-tuning sampling, so
    the seed-to-seed spread they share cancels out.
    """

    def by_seed(m: str) -> dict[int, float]:
        return {r["seed"]: r["dice_mean"] for r in rows if r["method"] == m and r["label_fraction"] == fraction}

    ours, scratch = by_seed(method), by_seed(SCRATCH)
    return [ours[s] - scratch[s] for s in sorted(ours) if s in scratch]


def aggregate(
    rows: Sequence[dict[str, Any]], methods: Sequence[str], fractions: Sequence[float]
) -> list[dict[str, Any]]:
    """One entry per (method, fraction) that has rows: mean and std over the seeds of every Dice, seconds."""
    keys, out = dice_keys(rows), []
    for method in methods:
        for fraction in fractions:
            cell = [r for r in rows if r["method"] == method and r["label_fraction"] == fraction]
            if not cell:
                continue
            entry: dict[str, Any] = {
                "method": method,
                "label_fraction": fraction,
                "seeds": sorted(r["seed"] for r in cell),
            }
            for key in keys:
                values = [r[key] for r in cell if key in r]
                entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std(values)
            entry["seconds_mean"] = round(statistics.fmean(r["seconds"] for r in cell), 1)
            if method != SCRATCH:
                deltas = paired_differences(rows, method, fraction)
                if deltas:
                    entry["vs_scratch_mean"], entry["vs_scratch_std"] = mean_std(deltas)
                    entry["vs_scratch_seeds"] = len(deltas)
            changes = [r["encoder_change"] for r in cell if r.get("encoder_change") is not None]
            if changes:
                entry["encoder_change_mean"] = round(statistics.fmean(changes), 5)
            out.append(entry)
    return out


def _pm(entry: dict[str, Any], key: str) -> str:
    return f"{entry[f'{key}_mean']:.4f} ± {entry[f'{key}_std']:.4f}"


def _column(key: str, class_names: dict[str, str]) -> str:
    if key == "dice_mean":
        return "mean Dice"
    return f"Dice {class_names.get(key.split('_')[1], key).lower()}"


def markdown(payload: dict[str, Any]) -> str:
    """The Markdown report: what was run, the full table, and mean Dice by label fraction."""
    b, cells, names = payload["budget"], payload["table"], payload.get("class_names", {})
    keys = dice_keys(payload["rows"]) if payload["rows"] else ["dice_mean"]
    lines = [
        f"# Method comparison: federated pretraining and fine-tuning, {b['sites']} sites",
        "",
        f"- data: {b['data']}; split: {b['split']}",
        f"- budget: pretraining rounds {b['pretrain_rounds']}, fine-tuning rounds {b['finetune_rounds']}, "
        f"local epochs per round {b['local_epochs']}; seeds (train.seed) {', '.join(map(str, payload['seeds']))}"
        + (f"; --set {' '.join(f'{k}={v}' for k, v in b['set'].items())}" if b["set"] else ""),
        f"- fine-tuning steps: {b.get('fine_tuning_steps', 'equal local epochs at every fraction')}",
        f"- machine: {_machine_line(payload['machine'])}",
    ]
    if payload.get("reduced_budget"):
        lines.append(f"- **{payload['reduced_budget']}**")
    lines += [
        "- cells: mean ± standard deviation over the seeds; seconds: wall time of one federated run "
        "(the largest fraction's run includes the pretraining)",
        "",
    ]
    columns = ["init", "labels", "seeds", *[_column(k, names) for k in keys], "seconds per run"]
    rows = [
        {
            "init": c["method"],
            "labels": pct(c["label_fraction"]),
            "seeds": len(c["seeds"]),
            **{_column(k, names): _pm(c, k) for k in keys},
            "seconds per run": f"{c['seconds_mean']:.0f}",
        }
        for c in cells
    ]
    lines += [table(rows, columns), ""]
    fractions = sorted({c["label_fraction"] for c in cells})
    methods = list(dict.fromkeys(c["method"] for c in cells))
    lines += ["Mean Dice by label fraction:", ""]
    pivot = []
    for m in methods:
        by = {pct(c["label_fraction"]): _pm(c, "dice_mean") for c in cells if c["method"] == m}
        pivot.append({"init": m, **by})
    lines += [table(pivot, ["init", *[pct(f) for f in fractions]]), ""]
    paired = [c for c in cells if "vs_scratch_mean" in c]
    if paired:
        lines += [
            "Mean Dice minus scratch's, paired by seed (same labelled cases and sampling), mean ± standard "
            "deviation over the seeds:",
            "",
        ]

        def signed(c: dict[str, Any]) -> str:
            return f"{c['vs_scratch_mean']:+.4f} ± {c['vs_scratch_std']:.4f}"

        diff = [
            {"init": m, **{pct(c["label_fraction"]): signed(c) for c in paired if c["method"] == m}}
            for m in dict.fromkeys(c["method"] for c in paired)
        ]
        lines += [table(diff, ["init", *[pct(f) for f in fractions]]), ""]
    changes = [f"{c['method']} {c['encoder_change_mean']:.3f}" for c in cells if "encoder_change_mean" in c]
    if changes:
        lines += [
            "How far federated pretraining moved the encoder from its initialisation (relative L2 change of "
            "its weights, mean over the seeds): " + ", ".join(changes) + ".",
            "",
        ]
    return "\n".join(lines)


def svg_plot(cells: Sequence[dict[str, Any]], title: str, subtitle: str = "") -> str:
    """Grouped bars of mean Dice (x: label fraction, one bar per method, error bars: std over seeds)."""
    fractions = sorted({c["label_fraction"] for c in cells})
    methods = list(dict.fromkeys(c["method"] for c in cells))
    by = {(c["method"], c["label_fraction"]): c for c in cells}
    width, height, left, right, top, bottom = 760, 420, 60, 140, 60, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    group_w = plot_w / max(len(fractions), 1)
    bar_w = group_w * 0.8 / max(len(methods), 1)

    # The y axis starts at 0 and ends at the first tick above every bar and error bar (at most 1),
    # so that small differences stay visible without a truncated axis.
    highest = max((c["dice_mean_mean"] + c["dice_mean_std"] for c in cells), default=1.0)
    step = 0.1 if highest <= 0.5 else 0.2
    y_max = min(1.0, max(1, math.ceil(round(highest / step, 6))) * step)

    def y(v: float) -> float:
        return top + plot_h * (1 - min(max(v, 0.0), y_max) / y_max)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<text x="{left}" y="40" fill="#444">{escape(subtitle)}</text>',
    ]
    for i in range(round(y_max / step) + 1):
        v = i * step
        parts.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + plot_w}" y2="{y(v):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    parts.append(
        f'<text x="16" y="{top + plot_h / 2:.1f}" transform="rotate(-90 16 {top + plot_h / 2:.1f})" '
        f'text-anchor="middle">mean Dice</text>'
    )
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>')
    for g, fraction in enumerate(fractions):
        x0 = left + g * group_w + group_w * 0.1
        parts.append(
            f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{top + plot_h + 20}" text-anchor="middle">'
            f"{escape(pct(fraction))} labels</text>"
        )
        for k, method in enumerate(methods):
            c = by.get((method, fraction))
            if c is None:
                continue
            mean, std = c["dice_mean_mean"], c["dice_mean_std"]
            x = x0 + k * bar_w
            color = COLORS[k % len(COLORS)]
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{y(mean):.1f}" width="{bar_w * 0.9:.1f}" '
                f'height="{top + plot_h - y(mean):.1f}" fill="{color}">'
                f"<title>{escape(method)}, {escape(pct(fraction))}: {mean:.4f} ± {std:.4f}</title></rect>"
            )
            cx = x + bar_w * 0.45
            if std > 0:
                lo, hi, cap = y(mean - std), y(mean + std), bar_w * 0.2
                parts.append(
                    f'<g class="errorbar" stroke="black"><line x1="{cx:.1f}" y1="{lo:.1f}" x2="{cx:.1f}" '
                    f'y2="{hi:.1f}"/><line x1="{cx - cap:.1f}" y1="{hi:.1f}" x2="{cx + cap:.1f}" '
                    f'y2="{hi:.1f}"/><line x1="{cx - cap:.1f}" y1="{lo:.1f}" x2="{cx + cap:.1f}" '
                    f'y2="{lo:.1f}"/></g>'
                )
    for k, method in enumerate(methods):  # legend
        ly = top + 10 + 20 * k
        parts.append(
            f'<rect x="{left + plot_w + 20}" y="{ly - 10}" width="12" height="12" fill="{COLORS[k % len(COLORS)]}"/>'
        )
        parts.append(f'<text x="{left + plot_w + 38}" y="{ly}">{escape(method)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# -- the benchmark ---------------------------------------------------------------------------


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


def _machine_line(info: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in info.items())


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
    out.with_suffix(".svg").write_text(
        svg_plot(payload["table"], f"Mean Dice on {b['data']}, mean ± std over seeds", subtitle)
    )
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
