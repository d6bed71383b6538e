"""AHM and ACE benchmark: step time against MAE, and where AHM's agent learns to mask.

1. Step time of ``ahm`` and ``ace`` as a ratio to ``mae`` on the same model and batch (AHM and
   MAE at the fixed ratio 0.75; ACE masks nothing and encodes two full views with the student
   and the teacher), one optimisation step each (the methods' own optimiser groups), measured
   interleaved in one process; the median of ``--repeats`` steps after two warm-up steps.
2. On phantoms with known lesions: the share of true lesion patches (patches holding any lesion
   voxel) among the patches AHM's agent masks, at initialisation (uniform policy: the lesion-patch
   fraction) and after a short AHM pretraining, against that fraction (``gain``). Lesions carry a
   high-frequency texture, so they are the hard patches an agent rewarded by reconstruction
   loss should learn to mask; the ceiling of the gain at ratio r is ``1 / r``.

    python -m simulations.benchmarks.ahm_ace_bench --out results/ahm_ace_bench.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import torch

from amlp_core.config import MethodConfig, ModelConfig, TrainConfig, build_config
from amlp_core.data import make_phantom_samples
from amlp_core.engine.loops import pretrain_epoch
from amlp_core.engine.optim import pretrain_optimizer
from amlp_core.engine.pipeline import data_defaults, make_loader
from amlp_core.methods import build_method
from amlp_core.models import patchify
from simulations.benchmarks.common import machine, setup_logging, table, write_json

log = logging.getLogger(__name__)
METHODS = ("mae", "ahm", "ace")


def step_times(model_cfg: ModelConfig, batch: int, repeats: int, warmup: int = 2,
               methods: tuple[str, ...] = METHODS) -> dict[str, float]:
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
            out = built[m].training_step(images, progress=1.0, generator=gens[m])
            optims[m].zero_grad()
            out.loss.backward()
            optims[m].step()
            if rep >= warmup:
                times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def agent_lesion_shares(method, samples, patch: int, ratios, seed: int = 0) -> list[dict]:
    """Share of true lesion patches among the agent's masked patches, per ratio."""
    images = torch.tensor(np.stack([s.image for s in samples]))
    labels = torch.tensor(np.stack([s.label for s in samples]))[:, None].float()
    truth = patchify(labels, patch).amax(-1) > 0  # [B, N]
    with torch.no_grad():
        scores = method.agent(images)
    expected = float(truth.float().mean())
    mass = float((torch.softmax(scores.logits, 1) * truth).sum(1).mean())
    rows = []
    for ratio in ratios:
        mask = method.agent.select(scores, ratio, torch.Generator().manual_seed(seed)).mask
        share = float((truth & mask.masked).sum() / mask.masked.sum())
        rows.append({"ratio": ratio, "lesion_patch_fraction": expected, "policy_mass": mass, "ahm_share": share,
                     "gain": share / expected, "ceiling": min(1 / ratio, 1 / expected)})
    return rows


def lesion_share_rows(dims: int, epochs: int) -> list[dict]:
    """AHM's lesion shares on held-out phantoms (the demo's model size), at init and after ``epochs``."""
    torch.manual_seed(0)
    cfg = build_config({**data_defaults("synthetic", dims=dims), "method.name": "ahm", "train.batch_size": 8,
                        "train.device": "cpu"})
    label = f"{dims}D {'x'.join(map(str, cfg.model.img_size))}, patch {cfg.model.patch_size}"
    held_out = make_phantom_samples(32, cfg.model.img_size, seed=123)
    method = build_method(cfg.model, cfg.method)
    ratios = (0.25, 0.5, 0.75)
    rows = [{"phantoms": label, "agent": "init", **r}
            for r in agent_lesion_shares(method, held_out, cfg.model.patch_size, ratios)]
    loader = make_loader(make_phantom_samples(64, cfg.model.img_size, seed=0), cfg, augment=True, labels=False)
    opt = pretrain_optimizer(method, cfg.train)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)
        metrics = pretrain_epoch(method, loader, opt, torch.device("cpu"), (epoch / epochs, (epoch + 1) / epochs), g)
        log.info("%s epoch %d: %s", label, epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
    rows += [{"phantoms": label, "agent": f"ahm {epochs} epochs", **r}
             for r in agent_lesion_shares(method, held_out, cfg.model.patch_size, ratios)]
    return rows


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--skip-lesion-share", action="store_true")
    p.add_argument("--out", default="results/ahm_ace_bench.json")
    args = p.parse_args()
    payload: dict = {"benchmark": "ahm_ace_bench", "machine": machine()}

    label = "3D 48x64x48, patch 8 (hippocampus model)"
    t = step_times(ModelConfig(), args.batch, args.repeats)
    timing = [{"model": label, "batch": args.batch, **{f"{m}_s": t[m] for m in METHODS},
               "ahm/mae": t["ahm"] / t["mae"], "ace/mae": t["ace"] / t["mae"]}]
    log.info("%s: %s", label, timing[-1])
    payload["step_time"] = timing
    print(table(timing, ["model", "batch", "mae_s", "ahm_s", "ace_s", "ahm/mae", "ace/mae"]))

    if not args.skip_lesion_share:
        rows = []
        for dims in (2, 3):
            rows += lesion_share_rows(dims, args.pretrain_epochs)
        payload["lesion_share"] = rows
        print(table(rows, ["phantoms", "agent", "ratio", "lesion_patch_fraction", "policy_mass", "ahm_share",
                           "gain", "ceiling"]))
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
