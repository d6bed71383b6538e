"""The comparison's Markdown report."""

from __future__ import annotations

import logging
from typing import Any

from amlp_core.engine.lesions import EMPTY_SHARE, LESION_DICE
from simulations.benchmarks.common import (
    table,
)
from simulations.benchmarks.comparison.plan import pct
from simulations.benchmarks.comparison.stats import dice_keys

log = logging.getLogger(__name__)
NAMED = {LESION_DICE: "lesion Dice", EMPTY_SHARE: "lesion-free predicted empty"}
#: The paired differences the report shows (stats.aggregate's keys), each under its own heading.
PAIRINGS = (
    ("vs_scratch", "minus scratch's"),
    ("vs_supervised", "of a semi-supervised row minus its start's on labels only"),
    ("vs_scratch_semi", "of a pretrained start's semi-supervised row minus scratch's with the same loss"),
)


def _pm(entry: dict[str, Any], key: str) -> str:
    return f"{entry[f'{key}_mean']:.4f} ± {entry[f'{key}_std']:.4f}"


def _column(key: str, class_names: dict[str, str]) -> str:
    if key == "dice_mean":
        return "mean Dice"
    if key in NAMED:
        return NAMED[key]
    return f"Dice {class_names.get(key.split('_')[1], key).lower()}"


def markdown(payload: dict[str, Any]) -> str:
    """The Markdown report: what was run, the full table, and mean Dice by label fraction."""
    b, cells, names = payload["budget"], payload["table"], payload.get("class_names", {})
    keys = dice_keys(payload["rows"]) if payload["rows"] else ["dice_mean"]
    lines = [
        f"# Method comparison: federated pretraining and fine-tuning, {b['sites']} sites"
        + (f", cases dealt by {b['partition']}" if b.get("partition", "iid") != "iid" else ""),
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
    metric = str(cells[0].get("metric", "dice_mean")) if cells else "dice_mean"
    lines += [f"{_column(metric, names)} by label fraction:", ""]
    pivot = []
    for m in methods:
        by = {pct(c["label_fraction"]): _pm(c, metric) for c in cells if c["method"] == m}
        pivot.append({"init": m, **by})
    lines += [table(pivot, ["init", *[pct(f) for f in fractions]]), ""]
    for key, title in PAIRINGS:
        paired = [c for c in cells if f"{key}_mean" in c]
        if not paired:
            continue
        lines += [
            f"{_column(metric, names)} {title}, paired by seed (same labelled cases and sampling), mean ± standard "
            "deviation over the seeds:",
            "",
        ]

        def signed(c: dict[str, Any], key: str = key) -> str:
            return f"{c[f'{key}_mean']:+.4f} ± {c[f'{key}_std']:.4f}"

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


def _machine_line(info: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in info.items())
