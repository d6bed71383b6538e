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

import torch

from amlp_core.config import ModelConfig
from simulations.benchmarks.common import machine, setup_logging, table, write_json
from simulations.benchmarks.mps_bench import before_and_after_pretraining, lesion_patches, step_times

log = logging.getLogger(__name__)
METHODS = ("mae", "ahm", "ace")


def agent_lesion_shares(method, samples, patch: int, ratios, seed: int = 0) -> list[dict]:
    """Share of true lesion patches among the agent's masked patches, per ratio."""
    images, truth = lesion_patches(samples, patch)  # [B, C, *S], [B, N]
    with torch.no_grad():
        scores = method.agent(images)
    expected = float(truth.float().mean())
    mass = float((torch.softmax(scores.logits, 1) * truth).sum(1).mean())
    rows = []
    for ratio in ratios:
        mask = method.agent.select(scores, ratio, torch.Generator().manual_seed(seed)).mask
        share = float((truth & mask.masked).sum() / mask.masked.sum())
        rows.append(
            {
                "ratio": ratio,
                "lesion_patch_fraction": expected,
                "policy_mass": mass,
                "ahm_share": share,
                "gain": share / expected,
                "ceiling": min(1 / ratio, 1 / expected),
            }
        )
    return rows


def lesion_share_rows(dims: int, epochs: int) -> list[dict]:
    """AHM's lesion shares on held-out phantoms, at init and after ``epochs`` of AHM pretraining."""

    def measure(method, samples, patch):
        return agent_lesion_shares(method, samples, patch, (0.25, 0.5, 0.75))

    return before_and_after_pretraining("ahm", dims, epochs, measure, key="agent")


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
    t = step_times(ModelConfig(), args.batch, args.repeats, methods=METHODS)
    timing = [
        {
            "model": label,
            "batch": args.batch,
            **{f"{m}_s": t[m] for m in METHODS},
            "ahm/mae": t["ahm"] / t["mae"],
            "ace/mae": t["ace"] / t["mae"],
        }
    ]
    log.info("%s: %s", label, timing[-1])
    payload["step_time"] = timing
    print(table(timing, ["model", "batch", "mae_s", "ahm_s", "ace_s", "ahm/mae", "ace/mae"]))

    if not args.skip_lesion_share:
        rows = []
        for dims in (2, 3):
            rows += lesion_share_rows(dims, args.pretrain_epochs)
        payload["lesion_share"] = rows
        print(
            table(
                rows,
                ["phantoms", "agent", "ratio", "lesion_patch_fraction", "policy_mass", "ahm_share", "gain", "ceiling"],
            )
        )
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
