"""MPS benchmark: step time of each method against MAE, and how many lesion patches MPS masks.

1. Step time of ``amlp`` and ``mps_ams`` as a ratio to ``mae`` on the same model and batch,
   at the same masking ratio (0.75), measured interleaved in one process (target: <= 1.10).
2. On phantoms with known lesions: the share of true lesion patches (patches holding any
   lesion voxel) among the patches MPS masks, against uniformly random masking at the same
   ratio (target: at least twice random's; ``gain`` is MPS's share over random's expected
   share, the lesion-patch fraction; one random draw's share is shown beside it). Measured
   with the encoder at initialisation and after a short AMLP pretraining, whose running
   per-group loss then picks the lesion group. With a budget of r*N patches the share can
   exceed random's by at most 1/r, so the target is read at r = 0.25, the ratio AMR starts
   from; the table gives r = 0.5 and 0.75 too.

    python -m simulations.benchmarks.mps_bench --out results/mps_bench.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from amlp_core.config import MethodConfig, ModelConfig, TrainConfig, build_config
from amlp_core.data import make_phantom_samples
from amlp_core.engine.local import make_loader
from amlp_core.engine.loops import pretrain_epoch
from amlp_core.engine.optim import pretrain_optimizer
from amlp_core.engine.split import data_defaults, load_split, with_plan
from amlp_core.masking import random_mask
from amlp_core.methods import build_method
from amlp_core.models import patchify
from simulations.benchmarks.common import machine, set_overrides, setup_logging, table, write_json

log = logging.getLogger(__name__)
METHODS = ("mae", "mps_ams", "amlp")


def step_times(
    model_cfg: ModelConfig, batch: int, repeats: int, warmup: int = 2, methods: tuple[str, ...] = METHODS
) -> dict[str, float]:
    """Median seconds of one optimisation step per method, methods interleaved step by step."""
    torch.manual_seed(0)
    images = torch.tensor(np.stack([s.image for s in make_phantom_samples(batch, model_cfg.img_size, seed=0)]))
    built = {m: build_method(model_cfg, MethodConfig(name=m)) for m in methods}
    optims = {m: pretrain_optimizer(built[m], TrainConfig()) for m in methods}
    gens = {m: torch.Generator().manual_seed(0) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(warmup + repeats):
        for m in methods:
            start = time.perf_counter()
            out = built[m].training_step(images, progress=1.0, generator=gens[m])  # ratio 0.75 for MAE and MPS
            optims[m].zero_grad()
            out.loss.backward()
            optims[m].step()
            if rep >= warmup:
                times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def lesion_patches(samples, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[B, C, *S]`` and which of their patches hold any lesion voxel ``[B, N]``."""
    images = torch.tensor(np.stack([s.image for s in samples]))
    labels = torch.tensor(np.stack([s.label for s in samples]))[:, None].float()
    return images, patchify(labels, patch).amax(-1) > 0


def lesion_shares(method, samples, patch: int, ratios, seed: int = 0) -> list[dict]:
    """Share of true lesion patches among MPS-masked and randomly masked patches, per ratio."""
    images, truth = lesion_patches(samples, patch)  # [B, C, *S], [B, N]
    with torch.no_grad():
        feats = method.mps.features(method.describe_patches(images, method.encoder.first_conv(images)), images, patch)
    rows = []
    for ratio in ratios:
        g = torch.Generator().manual_seed(seed)
        mask = method.mps.select(method.mps.cluster(feats, g), ratio, g)
        rmask = random_mask(images.shape[0], truth.shape[1], ratio, torch.Generator().manual_seed(seed))
        mps_share = float((truth & mask.masked).sum() / mask.masked.sum())
        rnd_share = float((truth & rmask.masked).sum() / rmask.masked.sum())
        expected = float(truth.float().mean())  # a uniformly random mask's expected share
        rows.append(
            {
                "ratio": ratio,
                "lesion_patch_fraction": expected,
                "random_share": rnd_share,
                "mps_share": mps_share,
                "gain": mps_share / expected,
                "ceiling": min(1 / ratio, 1 / expected),
            }
        )
    return rows


def before_and_after_pretraining(method_name: str, dims: int, epochs: int, measure, key: str = "encoder") -> list[dict]:
    """``measure(method, held_out_samples, patch) -> rows`` on 32 held-out phantoms (the demo's model
    size), at initialisation and after ``epochs`` of ``method_name`` pretraining on 64 other phantoms."""
    cfg = build_config(
        {
            **data_defaults("synthetic", dims=dims),
            "method.name": method_name,
            "train.batch_size": 8,
            "train.device": "cpu",
        }
    )
    label = f"{dims}D {'x'.join(map(str, cfg.model.img_size))}, patch {cfg.model.patch_size}"
    held_out = make_phantom_samples(32, cfg.model.img_size, seed=123)
    train = make_phantom_samples(64, cfg.model.img_size, seed=0)
    return measured_pretraining(cfg, train, held_out, label, epochs, measure, key)


def measured_pretraining(cfg, train, held_out, label: str, epochs: int, measure, key: str = "encoder") -> list[dict]:
    """``measure(method, held_out, patch) -> rows`` at initialisation and after ``epochs`` of
    ``cfg.method`` pretraining on ``train`` (their labels unused), each row tagged ``{"phantoms": label}``."""
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.method)
    rows = [{"phantoms": label, key: "init", **r} for r in measure(method, held_out, cfg.model.patch_size)]
    loader = make_loader(train, cfg, augment=True, labels=False)
    opt = pretrain_optimizer(method, cfg.train)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)
        metrics = pretrain_epoch(method, loader, opt, torch.device("cpu"), (epoch / epochs, (epoch + 1) / epochs), g)
        log.info("%s %s epoch %d: %s", label, cfg.method.name, epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
    rows += [
        {"phantoms": label, key: f"{cfg.method.name} {epochs} epochs", **r}
        for r in measure(method, held_out, cfg.model.patch_size)
    ]
    return rows


def _shares_with_group_loss(method, samples, patch):
    return [
        {**r, "group_loss": method.mps.group_loss.tolist()}
        for r in lesion_shares(method, samples, patch, (0.25, 0.5, 0.75))
    ]


def lesion_share_rows(dims: int, pretrain_epochs: int) -> list[dict]:
    """MPS's lesion shares at initialisation and after AMLP pretraining (whose running group
    losses may then pick another group)."""
    return before_and_after_pretraining("amlp", dims, pretrain_epochs, _shares_with_group_loss)


def real_lesion_share_rows(path: str, pretrain_epochs: int, overrides: dict) -> list[dict]:
    """MPS's lesion shares on real lesions: the test images of the dataset at ``path`` that hold a lesion
    (BUSI's benign and malignant ones), on the run's plan, at initialisation and after AMLP pretraining
    on its training images (labels unused)."""
    cfg = build_config({**data_defaults(path), "method.name": "amlp", "train.device": "cpu", **overrides})
    split = load_split(cfg)
    cfg = with_plan(cfg, split)
    held_out = [s for s in split.test if s.label is not None and s.label.any()]
    label = f"{Path(path).name} {'x'.join(map(str, cfg.model.img_size))}, patch {cfg.model.patch_size}"
    label += "".join(f", {k.split('.')[-1]}={v}" for k, v in overrides.items() if k.startswith("method."))
    log.info("%s: %d training images, %d held-out lesion images", label, len(split.train), len(held_out))
    return measured_pretraining(cfg, split.train, held_out, label, pretrain_epochs, _shares_with_group_loss)


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--parts", default="timing,shares", help="timing (needs an idle machine), shares, or both")
    p.add_argument("--data", help="a dataset with lesion masks (BUSI): measure the shares on its lesions, not phantoms")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config value (with --data)")
    p.add_argument("--out", default="results/mps_bench.json")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    payload: dict = {"benchmark": "mps_bench", "machine": machine()}

    timing_rows = []
    models = (
        ("3D 48x64x48, patch 8 (hippocampus model)", ModelConfig()),
        ("2D 128x128, patch 8", ModelConfig(spatial_dims=2, img_size=(128, 128), num_classes=2)),
    )
    for label, model_cfg in models if "timing" in parts else ():
        t = step_times(model_cfg, args.batch, args.repeats)
        timing_rows.append(
            {
                "model": label,
                **{f"{m}_s": t[m] for m in METHODS},
                "mps_ams/mae": t["mps_ams"] / t["mae"],
                "amlp/mae": t["amlp"] / t["mae"],
            }
        )
        log.info("%s: %s", label, timing_rows[-1])
    payload["step_time"] = timing_rows
    if timing_rows:
        print(table(timing_rows, ["model", "mae_s", "mps_ams_s", "amlp_s", "mps_ams/mae", "amlp/mae"]))

    share_rows = []
    if args.data and "shares" in parts:
        share_rows += real_lesion_share_rows(args.data, args.pretrain_epochs, set_overrides(args.set))
    for dims in (3, 2) if "shares" in parts and not args.data else ():
        share_rows += lesion_share_rows(dims, args.pretrain_epochs)
    payload["lesion_share"] = share_rows
    print(
        table(
            share_rows,
            ["phantoms", "encoder", "ratio", "lesion_patch_fraction", "random_share", "mps_share", "gain", "ceiling"],
        )
    )
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
