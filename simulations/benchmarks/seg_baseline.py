"""Segmentation from scratch at equal CPU time: our ViT+conv network against a plain 3D U-Net.

DESIGN.md section 6: a MONAI ``UNet`` (channels 16-128, Dice+CE, flips, no pretraining)
reached about 0.85 mean Dice after 10 minutes on the 2-core CPU with all labels. The
product's segmentation network must not lose to it. Prints a table and writes JSON.

    python -m simulations.benchmarks.seg_baseline --minutes 10 --out results/seg_baseline.json
"""

from __future__ import annotations

import argparse
import logging

from monai.networks.nets import UNet

from amlp_core.config import build_config
from amlp_core.engine.pipeline import data_defaults, load_split, train_segmentation
from amlp_core.models import SegmentationNet
from simulations.benchmarks.common import HIPPOCAMPUS, HIPPOCAMPUS_SPLIT, machine, setup_logging, table, write_json

log = logging.getLogger(__name__)


def conv_unet(num_classes: int) -> UNet:
    """The floor to beat: plain 3D U-Net, channels 16-128, instance norm, two residual units."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=2, norm="instance")


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(HIPPOCAMPUS))
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--label-fractions", default="1.0")
    p.add_argument("--models", default="unet,ours")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="results/seg_baseline.json")
    args = p.parse_args()

    cfg = build_config({**data_defaults(args.data), **HIPPOCAMPUS_SPLIT, "train.epochs": 10_000,
                        "train.max_minutes": args.minutes, "train.seed": args.seed, "train.batch_size": 8,
                        "train.num_threads": args.threads})
    split = load_split(cfg)
    rows = []
    for fraction in [float(f) for f in args.label_fractions.split(",")]:
        for name in args.models.split(","):
            model = conv_unet(cfg.model.num_classes) if name == "unet" else SegmentationNet(cfg.model)
            run_cfg = cfg.replace(train={"label_fraction": fraction})
            result = train_segmentation(model, run_cfg, f"runs/seg_baseline/{name}_{fraction}", split,
                                        init_method="scratch")
            params = sum(p.numel() for p in model.parameters())
            rows.append({"model": name, "label_fraction": fraction, "labelled_cases": result["labelled_cases"],
                         "epochs": result["epochs"], "train_seconds": result["train_seconds"],
                         "params_M": round(params / 1e6, 2), **{k: v for k, v in result.items()
                                                                  if k.startswith("dice_")}})
            log.info("%s at %.0f %% labels: mean Dice %.4f", name, 100 * fraction, result["dice_mean"])
    cols = ["model", "label_fraction", "labelled_cases", "epochs", "train_seconds", "params_M", "dice_1", "dice_2",
            "dice_mean"]
    print(table(rows, cols))
    path = write_json(args.out, {"benchmark": "seg_baseline", "minutes": args.minutes, "threads": args.threads,
                                 "machine": machine(),
                                 "split": HIPPOCAMPUS_SPLIT, "test_cases": len(split.test), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
