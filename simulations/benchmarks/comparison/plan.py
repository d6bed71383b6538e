"""The comparison's plan: its arguments, the budget, and the configuration and run of each federated run."""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from amlp_core import protocol as P
from amlp_core.config import METHOD_NAMES, Config, build_config
from amlp_core.config.schema import PARTITIONS, SEMI_METHODS
from amlp_core.engine.checkpoint import load_checkpoint
from amlp_core.engine.lesions import LESION_KEYS
from amlp_core.engine.split import data_defaults
from amlp_core.engine.weights import initial_shared_state
from server.federation import ENCODER_DIR, MODEL_DIR
from server.results import RunRecord
from simulations.benchmarks.common import (
    HIPPOCAMPUS,
    HIPPOCAMPUS_SPLIT,
    SEMI_JOIN,
    set_overrides,
)
from simulations.simulate import default_run_config, simulate

log = logging.getLogger(__name__)


SCRATCH = "scratch"


UNET = "unet"  # fine-tuned from scratch like SCRATCH, with model.seg_arch=unet (a plain conv U-Net)


#: Methods without pretraining: one fine-tuning-only run per fraction, no encoder needed.
SCRATCH_LIKE = (SCRATCH, UNET)


ALL_METHODS = (*SCRATCH_LIKE, *METHOD_NAMES)


SUPERVISED = "none"  # train.semi_supervised of a row that fine-tunes on its labels only


def split_semi(row: str) -> tuple[str, str]:
    """A row's start and its ``train.semi_supervised``: ``"amlp + mean_teacher"`` -> ``("amlp",
    "mean_teacher")``, ``"amlp"`` -> ``("amlp", "none")``."""
    start, _, semi = row.partition(SEMI_JOIN)
    return start, semi or SUPERVISED


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        default="hippocampus",
        help="'hippocampus' (../shared/data/msd_hippocampus, fixed split), 'synthetic', or a dataset folder",
    )
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated, 'scratch' and 'unet' included")
    p.add_argument("--fractions", default="0.1,0.25,1.0", help="label fractions, comma-separated")
    p.add_argument(
        "--semi",
        default=SUPERVISED,
        help="train.semi_supervised values, each with every method, e.g. none,mean_teacher (none: labels only); "
        "a semi-supervised row is named '<method> + <value>' and fine-tunes from that method's start",
    )
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (train.seed = 0 .. N-1)")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument(
        "--partition",
        default="iid",
        choices=PARTITIONS,
        help="how the training cases are dealt to the sites: iid, dirichlet (quantity skew), category (class skew)",
    )
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
    semis = [s.strip() for s in args.semi.split(",") if s.strip()]
    if not semis or any(s not in SEMI_METHODS for s in semis):
        p.error(f"--semi: {args.semi!r}; choose from {', '.join(SEMI_METHODS)}")
    args.methods = [m if s == SUPERVISED else m + SEMI_JOIN + s for m in args.methods for s in semis]
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
        "partition": args.partition,
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
        "federation.partition": args.partition,
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
    and ``unet`` sets ``model.seg_arch=unet``. A row ``"<method> + <semi>"`` sets ``train.semi_supervised``
    (every other row sets it to ``none``).

    ``local_epochs`` (when given) replaces the base's, for a fine-tuning-only run at a small fraction.
    """
    method, semi = split_semi(method)
    overrides = {
        **base,
        "train.semi_supervised": semi,
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


def pct(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def run_name(method: str, fraction: float, seed: int) -> str:
    """The run's folder under ``--runs``: ``seed0/amlp_10pct``, ``seed0/amlp+mean_teacher_10pct``."""
    return f"seed{seed}/{method.replace(SEMI_JOIN, '+')}_{fraction * 100:g}pct"


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
    record = RunRecord.read(run_dir)
    final = record.final_evaluation()
    if final is None:
        raise RuntimeError(f"{run_dir}: the federation ended without an evaluation")
    last_train = [
        r for r in record.select(phase=P.FINETUNE, kind=P.TRAIN, status=P.OK, aggregate=False) if r.round == final.round
    ]
    row = {k: v for k, v in final.values.items() if k.startswith("dice_") or k in LESION_KEYS}
    epsilon = spent_epsilon(record)
    if epsilon is not None:
        row["epsilon"] = epsilon
    row.update(
        seconds=round(seconds, 1),
        labelled_cases=sum(r.get(P.NUM_EXAMPLES, 0) for r in last_train),
        pretrain_seconds=round(record.round_seconds(P.PRETRAIN), 1),
        finetune_seconds=round(record.round_seconds(P.FINETUNE), 1),
    )
    _, meta = load_checkpoint(run_dir / MODEL_DIR / "checkpoint.pt")
    log.info(
        "%s: done in %.0f s, %s",
        label,
        seconds,
        ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("dice_")),
    )
    return row, dict(meta.get("class_names", {}))


def spent_epsilon(record: RunRecord) -> float | None:
    """Under site DP, the largest epsilon a site spent over the whole run (its ledger's last value), else None."""
    spent = [r.number(P.EPSILON) for r in record.select(kind=P.TRAIN, status=P.OK, aggregate=False)]
    values = [e for e in spent if e is not None]
    return max(values) if values else None


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
