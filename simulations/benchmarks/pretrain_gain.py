"""Pretraining gain: few-label segmentation from a pretrained encoder against from scratch, paired by seed.

The product exists so that unlabelled scans make a few-label model better; this benchmark measures
that on the hippocampus data (the fixed split of :data:`~simulations.benchmarks.common.HIPPOCAMPUS_SPLIT`:
160 training cases, 48 test cases). For every label fraction, seed and initialisation it fine-tunes
the segmentation network for the same optimiser steps and reports the test Dice; each method is then
compared with scratch (and AMLP with MAE) *paired by seed*: runs with the same seed share the
labelled subset, the decoder's initialisation and the sampling, so the spread they share cancels.

- Initialisations: ``scratch`` (no pretraining), ``unet`` (the plain conv U-Net, also from scratch)
  and each pretraining method at each of
  ``--pretrain-epochs`` (self-supervised epochs over all 160 training images, labels unused). One
  pretraining per method and budget serves every fine-tuning seed (``--pretrain-seed``).
- The fine-tuning curve (test Dice every ``--curve-every`` steps) is kept, so a reader can see
  whether scratch has converged.
- Resumable: every finished fine-tuning run is a row of ``--out`` (rewritten after each), a
  finished pretraining is reused from ``--runs``; run the same command again to continue.

    python -m simulations.benchmarks.pretrain_gain --fractions 0.1 --methods scratch,mae,amlp --seeds 0,1,2 \\
        --pretrain-epochs 50 --finetune-steps 800 --set train.batch_size=4 --out results/pretrain_gain.json

Budgets are in epochs and steps, not wall time, so other load on the machine does not change a result.
One site only. The federated rows (4 sites, the same pairing by seed) come from
:mod:`simulations.benchmarks.compare` with ``--methods scratch,mae,amlp --sites 4``, whose table has each
method minus scratch paired by seed (docs/results.md gives the command).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from amlp_core.config import Config, build_config
from amlp_core.engine.artefacts import CHECKPOINT, METRICS
from amlp_core.engine.checkpoint import load_checkpoint
from amlp_core.engine.lesions import EMPTY_SHARE, LESION_DICE, LESION_KEYS
from amlp_core.engine.pipeline import finetune, pretrain
from amlp_core.engine.split import DataSplit, data_defaults, load_split
from amlp_core.errors import CheckpointError, ConfigError
from simulations.benchmarks.common import (
    HIPPOCAMPUS,
    HIPPOCAMPUS_SPLIT,
    SEMI_JOIN,
    benchmark_parser,
    machine,
    mean_std,
    paired_test,
    seed_differences,
    set_overrides,
    table,
    write_json,
    write_results,
)

log = logging.getLogger(__name__)
SCRATCH = "scratch"
UNET = "unet"  # the plain conv U-Net from scratch (model.seg_arch=unet): the floor every gain is measured against
METRIC_NAMES = {"dice_mean": "mean Dice", LESION_DICE: "lesion Dice"}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


#: The training settings a pretraining run depends on (the fine-tuning ones may differ between reuses).
PRETRAIN_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "seed", "augment")


def _pretraining_settings(config: dict) -> dict:
    return {
        "model": config["model"],
        "method": config["method"],
        "data": config["data"],
        "train": {k: config["train"].get(k) for k in PRETRAIN_KEYS},
    }


def _finished(run: Path, cfg: Config) -> bool:
    """A pretraining run in ``run`` that completed ``cfg``'s epochs with ``cfg``'s pretraining settings."""
    try:
        _, meta = load_checkpoint(run / CHECKPOINT)
    except CheckpointError:
        return False
    if meta.get("epoch") != cfg.train.epochs or "config" not in meta:
        return False
    try:  # the saved settings with today's defaults for keys added since
        saved = build_config(meta["config"]).to_dict()
    except ConfigError:
        return False
    return _pretraining_settings(saved) == _pretraining_settings(cfg.to_dict())


def pretrained(cfg: Config, method: str, epochs: int, seed: int, runs: Path, split: DataSplit) -> dict[str, Any]:
    """The pretraining run of ``method`` for ``epochs`` (made, or reused when finished): its folder and cost."""
    pre_cfg = cfg.replace(method={"name": method}, train={"epochs": epochs, "seed": seed})
    digest = hashlib.sha256(
        json.dumps(_pretraining_settings(pre_cfg.to_dict()), sort_keys=True, default=str).encode()
    ).hexdigest()[:8]
    folder = runs / f"pretrain_{method}_e{epochs}_s{seed}_{digest}"  # one folder per pretraining setting
    if not _finished(folder, pre_cfg):
        pretrain(pre_cfg, folder, split)
    last = json.loads((folder / METRICS).read_text().splitlines()[-1])
    return {"folder": folder, "seconds": last["seconds"], "final_loss": last["loss"]}


def curve(run: Path) -> list[dict[str, float]]:
    """The fine-tuning curve of a run: step, training loss and (where measured) test Dice and lesion metrics."""
    points = []
    for line in (run / METRICS).read_text().splitlines():
        record = json.loads(line)
        point = {"step": record.get("step"), "loss": record.get("loss")}
        point.update({k: record[k] for k in ("test_dice_mean", "test_lesion_dice", "test_empty_share") if k in record})
        points.append(point)
    return points


def paired(
    rows: list[dict], fraction: float, init: str, baseline: str, metric: str = "dice_mean"
) -> dict[str, Any] | None:
    """``init`` minus ``baseline`` in ``metric`` at ``fraction``, seed by seed (only seeds both have)."""
    by_seed = seed_differences(rows, "init", init, baseline, fraction, metric)
    if not by_seed:
        return None
    diffs = list(by_seed.values())
    test = paired_test(diffs)
    return {"mean": test["mean"], "std": test["std"], "seeds": list(by_seed), "per_seed": diffs, **test}


def summary(rows: list[dict], fractions: list[float], metric: str = "dice_mean") -> tuple[list[dict], str]:
    """Per fraction and initialisation: ``metric`` (mean Dice; lesion Dice for lesion data) over seeds and
    the paired differences, and, for lesion data, the share of lesion-free images predicted empty; and the
    Markdown."""
    out, parts = [], []
    for fraction in fractions:
        inits = list(dict.fromkeys(r["init"] for r in rows if r["label_fraction"] == fraction))
        lines = []
        for init in inits:
            these = [r for r in rows if r["label_fraction"] == fraction and r["init"] == init]
            mean, std = mean_std([r[metric] for r in these])
            entry: dict[str, Any] = {
                "label_fraction": fraction,
                "init": init,
                "seeds": len(these),
                "metric": metric,
                "dice_mean": mean,
                "dice_std": std,
            }
            empty = [r[EMPTY_SHARE] for r in these if EMPTY_SHARE in r]
            if empty:
                entry["empty_share"] = mean_std(empty)[0]
            if init != SCRATCH:
                entry["minus_scratch"] = paired(rows, fraction, init, SCRATCH, metric)
            if init.startswith("amlp "):  # against MAE at the same pretraining budget
                entry["minus_mae"] = paired(rows, fraction, init, "mae " + init.removeprefix("amlp "), metric)
            if SEMI_JOIN in init:  # semi-supervised: against the same start trained on its labels only
                base, semi = init.rsplit(SEMI_JOIN, 1)  # ("amlp 50 ep", "fixmatch [variant]")
                variant = semi[semi.index(" [") :] if " [" in semi else ""
                supervised = base if base in (SCRATCH, UNET) else base + variant
                entry["minus_supervised"] = paired(rows, fraction, init, supervised, metric)
                if base != SCRATCH:
                    entry["minus_scratch_semi"] = paired(rows, fraction, init, SCRATCH + SEMI_JOIN + semi, metric)
            out.append(entry)

            def fmt(d):
                if not d:
                    return ""
                per = ", ".join(f"{v:+.3f}" for v in d["per_seed"])
                p = f", p {d['p']:.3f}" if d.get("p") is not None else ""
                return f"{d['mean']:+.4f} ± {d['std']:.4f} ({per}): {d.get('verdict', '')}{p}"

            lines.append(
                {
                    "init": init,
                    "seeds": len(these),
                    METRIC_NAMES[metric]: f"{mean:.4f} ± {std:.4f}",
                    "lesion-free predicted empty": f"{entry['empty_share']:.3f}" if empty else "",
                    "minus scratch (paired)": fmt(entry.get("minus_scratch")),
                    "AMLP minus MAE (paired)": fmt(entry.get("minus_mae")),
                    "semi minus supervised (paired)": fmt(entry.get("minus_supervised")),
                    "minus scratch + semi (paired)": fmt(entry.get("minus_scratch_semi")),
                }
            )
        semi = any("minus_supervised" in e for e in out)
        columns = (
            ["init", "seeds", METRIC_NAMES[metric]]
            + (["lesion-free predicted empty"] if any("empty_share" in e for e in out) else [])
            + ["minus scratch (paired)", "AMLP minus MAE (paired)"]
            + (["semi minus supervised (paired)", "minus scratch + semi (paired)"] if semi else [])
        )
        parts.append(f"### {100 * fraction:g} % labels\n\n" + table(lines, columns))
    return out, "\n\n".join(parts)


def _parser():
    p = benchmark_parser(__doc__, "results/pretrain_gain.json")
    p.add_argument("--methods", default="scratch,mae,amlp", help="initialisations: scratch and pretraining methods")
    p.add_argument("--fractions", default="0.1,1.0")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds (labelled subset, decoder, sampling)")
    p.add_argument("--pretrain-epochs", default="50", help="pretraining budgets, e.g. 25,50,100")
    p.add_argument("--pretrain-seed", type=int, default=0)
    p.add_argument("--finetune-steps", type=int, default=800, help="optimiser steps of every fine-tuning run")
    p.add_argument("--curve-every", type=int, default=100, help="test Dice every this many steps (0: end only)")
    p.add_argument(
        "--variant",
        default="",
        help="a name for this invocation's --set (e.g. a fine-tuning recipe): "
        "appended to the pretrained rows' names and run folders, so variants share one --out",
    )
    p.add_argument(
        "--semi",
        default="none",
        help="train.semi_supervised values, each with every start (none: supervised only), e.g. none,fixmatch",
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--metric",
        default="",
        help="the figure compared: dice_mean, or lesion_dice (Dice over the images with a lesion; the default "
        "for 2D lesion images such as BUSI)",
    )
    p.add_argument("--runs", default="runs/pretrain_gain")
    return p


Init = tuple[str, str | None, int, str]  # (row name, pretraining method or None, pretraining epochs, semi)


def _inits(methods: list[str], budgets: list[int], variant: str, semis: list[str] | None = None) -> list[Init]:
    """The rows: ``(row name, pretraining method or None, pretraining epochs, train.semi_supervised)``; each
    start with each semi-supervised method (``none``: the plain name; else ``"<start> + <method>"``). The plain
    U-Net trains supervised only. Starts from scratch come first, so that a partial run pairs them early."""
    starts: list[tuple[str, str | None, int]] = []
    suffix = f" [{variant}]" if variant else ""
    for method in methods:
        if method in (SCRATCH, UNET):
            starts.append((method, None, 0))
        else:
            starts += [(f"{method} {e} ep{suffix}", method, e) for e in budgets]
    inits: list[Init] = []
    for name, method, epochs in sorted(starts, key=lambda s: s[1] is not None):
        for semi in semis or ["none"]:
            if semi == "none":
                inits.append((name, method, epochs, semi))
            elif name != UNET:  # a variant names the semi-supervised rows too: its --set is their recipe
                inits.append((name.removesuffix(suffix) + SEMI_JOIN + semi + suffix, method, epochs, semi))
    return inits


def _finetune_row(cfg, init: Init, fraction: float, seed: int, args, folder: Path | None, split):
    """One fine-tuning run from ``folder`` (a pretraining run, None: scratch) and its row."""
    name, method, epochs, semi = init
    ft_cfg = cfg.replace(
        train={
            "label_fraction": fraction,
            "seed": seed,
            "finetune_steps": args.finetune_steps,
            "eval_every": args.curve_every,
            "semi_supervised": semi,
        },
        model={"seg_arch": "unet" if name == UNET else cfg.model.seg_arch},
    )
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    run = Path(args.runs) / f"finetune_{slug}_f{fraction}_s{seed}"
    result = finetune(ft_cfg, run, init=folder, split=split)
    log.info("%s, %g %% labels, seed %d: mean Dice %.4f", name, 100 * fraction, seed, result["dice_mean"])
    return {
        "init": name,
        "method": method or name,
        "pretrain_epochs": epochs,
        "semi_supervised": semi,
        "overrides": args.set,
        "label_fraction": fraction,
        "seed": seed,
        "labelled_cases": result["labelled_cases"],
        "steps": args.finetune_steps,
        "train_seconds": result["train_seconds"],
        **{k: v for k, v in result.items() if k.startswith("dice_") or k in LESION_KEYS},
        "curve": curve(run),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    fixed_split = HIPPOCAMPUS_SPLIT if Path(args.data).resolve() == HIPPOCAMPUS.resolve() else {}
    defaults = data_defaults(args.data)
    cfg = build_config({**defaults, **fixed_split, "train.num_threads": args.threads, **set_overrides(args.set)})
    metric = args.metric or (LESION_DICE if cfg.model.spatial_dims == 2 and not cfg.data.as_slices else "dice_mean")
    runs = Path(args.runs)
    split = load_split(cfg)
    fractions, seeds, budgets = _floats(args.fractions), _ints(args.seeds), _ints(args.pretrain_epochs)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    rows: list[dict] = previous.get("rows", [])
    done = {(r["init"], r["label_fraction"], r["seed"]) for r in rows}
    header = {
        "benchmark": "pretrain_gain",
        "machine": machine(),
        "split": {"data.test_fraction": cfg.data.test_fraction, "data.split_seed": cfg.data.split_seed},
        "metric": metric,
        "train_cases": len(split.train),
        "test_cases": len(split.test),
        "finetune_steps": args.finetune_steps,
        "batch_size": cfg.train.batch_size,
        "pretrain_seed": args.pretrain_seed,
        "pretraining": previous.get("pretraining", {}),
    }
    semis = [m for m in args.semi.split(",") if m]
    inits = _inits([m for m in args.methods.split(",") if m], budgets, args.variant, semis)
    for fraction in fractions:
        for seed in seeds:
            for init in inits:
                name, method, epochs, _ = init
                if (name, fraction, seed) in done:
                    continue
                folder = None
                if method is not None:
                    pre = pretrained(cfg, method, epochs, args.pretrain_seed, runs, split)
                    header["pretraining"][name] = {k: pre[k] for k in ("seconds", "final_loss")} | {"epochs": epochs}
                    folder = pre["folder"]
                rows.append(_finetune_row(cfg, init, fraction, seed, args, folder, split))
                stats, _ = summary(rows, sorted({r["label_fraction"] for r in rows}), metric)
                write_json(out, {**header, "rows": rows, "summary": stats})
    stats, markdown = summary(rows, sorted({r["label_fraction"] for r in rows}), metric)  # every fraction so far
    payload = {**header, "rows": rows, "summary": stats}
    write_results(out, payload, markdown)
    return payload


if __name__ == "__main__":
    main()
