"""Segmentation from scratch at equal CPU time: our ViT+conv network against a plain 3D U-Net.

docs/results.md, how results are measured: a MONAI ``UNet`` (channels 16-128, Dice+CE, flips, no pretraining)
reached about 0.85 mean Dice after 10 minutes on the 2-core CPU with all labels. The
product's segmentation network must not lose to it. Prints a table and writes JSON. ``unet``
is the product's ``model.seg_arch=unet`` (:func:`amlp_core.models.plain_unet`), ``ours`` its
``model.seg_arch=vit`` (:class:`amlp_core.models.SegmentationNet`), both built by
:func:`amlp_core.models.build_segmentation_model`.

Equal CPU time is enforced by optimiser steps, not by the wall clock, so that other load on the
machine cannot favour either model: the step time of each model is measured first,
interleaved in this process, and each model then trains for the number of steps that
``--minutes`` of its own step time buys (its learning rate annealed over those steps).

    python -m simulations.benchmarks.seg_baseline --minutes 10 --out results/seg_baseline.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from amlp_core.config import Config, build_config
from amlp_core.engine.pipeline import train_segmentation
from amlp_core.engine.split import data_defaults, load_split
from amlp_core.models import build_segmentation_model
from simulations.benchmarks.common import HIPPOCAMPUS, HIPPOCAMPUS_SPLIT, machine, setup_logging, table, write_json

log = logging.getLogger(__name__)


#: Benchmark model name -> ``model.seg_arch``.
ARCHS = {"unet": "unet", "ours": "vit"}


def arch_config(cfg: Config, name: str) -> Config:
    """``cfg`` with the segmentation network of benchmark model ``name`` (the floor to beat: ``unet``)."""
    return cfg.replace(model={"seg_arch": ARCHS[name]})


def step_seconds(
    models: dict[str, torch.nn.Module], batch: int, size, num_classes: int, repeats: int = 5
) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, AdamW) per model, interleaved."""
    x = torch.randn(batch, 1, *size)
    y = torch.randint(0, num_classes, (batch, 1, *size))
    from amlp_core.losses import dice_ce_loss

    loss_fn = dice_ce_loss()
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for rep in range(repeats + 1):
        for k, m in models.items():
            start = time.perf_counter()
            loss = loss_fn(m(x), y)
            optims[k].zero_grad()
            loss.backward()
            optims[k].step()
            if rep:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(HIPPOCAMPUS))
    p.add_argument("--minutes", type=float, default=10.0, help="CPU-time budget per model, spent as epochs")
    p.add_argument("--label-fractions", default="1.0")
    p.add_argument("--models", default="unet,ours")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--step-seconds",
        help="use these step times (e.g. unet=0.53,ours=0.68, measured on an idle "
        "machine) instead of measuring now; the training itself may then share the machine",
    )
    p.add_argument("--out", default="results/seg_baseline.json")
    args = p.parse_args()

    cfg = build_config(
        {
            **data_defaults(args.data),
            **HIPPOCAMPUS_SPLIT,
            "train.seed": args.seed,
            "train.batch_size": 8,
            "train.num_threads": args.threads,
        }
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",")
    unknown = [n for n in names if n not in ARCHS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(ARCHS)}")
    split = load_split(cfg)

    def build(name: str) -> torch.nn.Module:
        torch.manual_seed(args.seed)
        return build_segmentation_model(arch_config(cfg, name).model)

    if args.step_seconds:
        steps = {k: float(v) for k, v in (item.split("=") for item in args.step_seconds.split(","))}
    else:
        steps = step_seconds(
            {n: build(n) for n in names}, cfg.train.batch_size, cfg.model.img_size, cfg.model.num_classes
        )
    log.info("step seconds: %s", steps)
    rows = []
    for fraction in [float(f) for f in args.label_fractions.split(",")]:
        for name in names:
            model = build(name)
            budget = max(1, int(60 * args.minutes / steps[name]))  # optimiser steps that --minutes buy
            run_cfg = arch_config(cfg, name).replace(train={"label_fraction": fraction, "finetune_steps": budget})
            result = train_segmentation(
                model, run_cfg, f"runs/seg_baseline/{name}_{fraction}", split, init_method="scratch"
            )
            params = sum(p.numel() for p in model.parameters())
            rows.append(
                {
                    "model": name,
                    "label_fraction": fraction,
                    "labelled_cases": result["labelled_cases"],
                    "step_seconds": round(steps[name], 3),
                    "steps": result["steps"],
                    "train_seconds": result["train_seconds"],
                    "params_M": round(params / 1e6, 2),
                    **{k: v for k, v in result.items() if k.startswith("dice_")},
                }
            )
            log.info("%s at %.0f %% labels: mean Dice %.4f", name, 100 * fraction, result["dice_mean"])
            path = write_json(
                args.out,
                {
                    "benchmark": "seg_baseline",
                    "minutes": args.minutes,
                    "threads": args.threads,
                    "step_seconds": steps,
                    "step_seconds_given": bool(args.step_seconds),
                    "machine": machine(),
                    "split": HIPPOCAMPUS_SPLIT,
                    "test_cases": len(split.test),
                    "rows": rows,
                },
            )  # after every row
    cols = [
        "model",
        "label_fraction",
        "labelled_cases",
        "step_seconds",
        "steps",
        "train_seconds",
        "params_M",
        "dice_1",
        "dice_2",
        "dice_mean",
    ]
    print(table(rows, cols))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
