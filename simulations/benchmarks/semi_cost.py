"""What a semi-supervised fine-tuning step costs against a supervised one, on the same batch, in one process.

For each input kind (BUSI's 2D 128 x 128 images, the hippocampus's 3D 48 x 64 x 48 crops; the networks and
batch sizes of their benchmarks), the same network and the same labelled batch of ``train.batch_size``
random images take ``--steps`` supervised steps and ``--steps`` steps of each semi-supervised method (which
adds an unlabelled batch of the same size, the teacher's forward pass and its EMA), in alternating blocks so
that drift in the machine's speed falls on both alike. The step is the product's own
(:func:`~amlp_core.engine.loops.finetune_steps`). Target (issue 27): at most 2.5x.

    python -m simulations.benchmarks.semi_cost --out results/semi_cost.json
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch

from amlp_core.config import build_config
from amlp_core.engine.device import make_generator, seed_everything, set_threads
from amlp_core.engine.loops import finetune_steps
from amlp_core.engine.optim import finetune_optimizer
from amlp_core.engine.semi import SemiObjective, SemiTraining
from amlp_core.losses import dice_ce_loss
from amlp_core.models import build_segmentation_model
from amlp_core.presets import ROI
from simulations.benchmarks.common import benchmark_parser, machine, set_overrides, table, write_json

log = logging.getLogger(__name__)
KINDS = {
    "2D 128x128 (BUSI)": {"model.spatial_dims": 2, "model.img_size": ROI["image"], "model.num_classes": 2},
    "3D 48x64x48 (hippocampus)": {"model.spatial_dims": 3, "model.img_size": ROI["volume"], "model.num_classes": 3},
}
for _kind in KINDS.values():  # (the config's phantoms must have the model's dimensions; none is generated)
    _kind["data.synthetic_size"] = _kind["model.img_size"]
METHODS = ("mean_teacher", "fixmatch", "copy_paste")


def _seconds_per_step(cfg, semi_method: str, steps: int, batch: dict, unlabelled: torch.Tensor) -> float:
    """Mean seconds of ``steps`` fine-tuning steps (after one untimed warm-up step)."""
    seed_everything(0)
    model = build_segmentation_model(cfg.model)
    optimizer = finetune_optimizer(model, cfg.train, pretrained=False)
    semi = None
    if semi_method != "none":
        train = cfg.replace(train={"semi_supervised": semi_method}).train
        objective = SemiObjective(train, model, make_generator(0, torch.device("cpu")))
        semi = SemiTraining(objective, [{"image": unlabelled}], lambda k: 1.0)  # type: ignore[arg-type]
    run = [batch]
    finetune_steps(model, run, optimizer, dice_ce_loss(), torch.device("cpu"), 1, semi=semi, amp=False)
    start = time.perf_counter()
    finetune_steps(model, run, optimizer, dice_ce_loss(), torch.device("cpu"), steps, semi=semi, amp=False)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = benchmark_parser(__doc__, "results/semi_cost.json")
    p.add_argument("--steps", type=int, default=5, help="timed steps per block")
    p.add_argument("--blocks", type=int, default=3, help="alternating blocks per setting")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    set_threads(args.threads)
    rows = []
    for kind, settings in KINDS.items():
        cfg = build_config({**settings, "train.device": "cpu", **set_overrides(args.set)})
        b, size = cfg.train.batch_size, cfg.model.img_size
        g = torch.Generator().manual_seed(0)
        batch = {
            "image": torch.randn(b, 1, *size, generator=g),
            "label": torch.randint(0, cfg.model.num_classes, (b, 1, *size), generator=g),
        }
        unlabelled = torch.randn(b, 1, *size, generator=g)
        times: dict[str, list[float]] = {m: [] for m in ("none", *METHODS)}
        for block in range(args.blocks):
            for method in times:
                times[method].append(_seconds_per_step(cfg, method, args.steps, batch, unlabelled))
                log.info("%s, block %d, %s: %.3f s/step", kind, block + 1, method, times[method][-1])
        supervised = statistics.median(times["none"])
        for method in METHODS:
            semi = statistics.median(times[method])
            rows.append(
                {
                    "input": kind,
                    "batch": b,
                    "method": method,
                    "supervised_s": round(supervised, 4),
                    "semi_s": round(semi, 4),
                    "ratio": round(semi / supervised, 3),
                }
            )
    payload = {"benchmark": "semi_cost", "machine": machine(), "steps": args.steps, "blocks": args.blocks, "rows": rows}
    write_json(args.out, payload)
    print(table(rows, ["input", "batch", "method", "supervised_s", "semi_s", "ratio"]))
    return payload


if __name__ == "__main__":
    main()
