"""Device check: every pretraining method and the segmentation network, one step at a time, on a device.

For each method (``mae``, ``mps_ams``, ``amlp``, ``ahm``, ``ace``) with each pretraining decoder
(``transformer``, ``unet``), and for the segmentation network (Dice + CE, fine-tuning's optimiser):
``--warmup`` steps, then ``--repeats`` timed steps (forward under bf16 autocast where the device
has it, backward, AdamW), the device synchronised around each. A row checks that the loss and
every gradient are finite, that autocast really ran in bf16 (the dtype of the encoder's first
linear layer's output inside the autocast region), and gives the median step time, the peak
device memory and the ratio to MAE's step with the same decoder. The first job of a lent GPU
(docs/results.md, how results are measured, issue 11 item 8); on the CPU it checks the same code paths in float32.

    python -m simulations.benchmarks.device_check --out results/device_check.json

Exit code 1 when a row fails a check (the table says which); the JSON is written either way.
The model is the hippocampus default (48 x 64 x 48, patch 8) unless ``--set model.KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from amlp_core.config import METHOD_NAMES, ModelConfig, build_config
from amlp_core.data import make_phantom_samples
from amlp_core.engine.device import autocast, resolve_device, uses_bf16
from amlp_core.engine.optim import finetune_optimizer, pretrain_optimizer
from amlp_core.errors import ConfigError
from amlp_core.losses import dice_ce_loss
from amlp_core.methods import build_method
from amlp_core.models import build_segmentation_model
from simulations.benchmarks.common import machine, set_overrides, setup_logging, table, write_json

log = logging.getLogger(__name__)
DECODERS = ("transformer", "unet")
COLUMNS = ["net", "decoder", "step_s", "vs_mae", "peak_mib", "autocast", "finite", "ok"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_linear_dtype(module: nn.Module) -> Callable[[], str]:
    """A hook on the first ``nn.Linear`` of ``module``; the returned call gives its last output's dtype."""
    seen: dict[str, str] = {"dtype": "none"}
    linear = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
    if linear is not None:
        linear.register_forward_hook(lambda _m, _i, out: seen.update(dtype=str(out.dtype).removeprefix("torch.")))
    return lambda: seen["dtype"]


def time_steps(
    step: Callable[[], torch.Tensor], params: list[nn.Parameter], device: torch.device, warmup: int, repeats: int
) -> dict[str, Any]:
    """Median seconds of ``step()`` (which returns the loss after its backward and optimiser step),
    whether every loss and gradient stayed finite, and the peak device memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, finite = [], True
    for rep in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        if rep >= warmup:
            times.append(time.perf_counter() - start)
        finite &= bool(torch.isfinite(loss).item())
        finite &= all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"step_s": statistics.median(times), "finite": finite, "peak_mib": peak}


def method_row(cfg, name: str, decoder: str, images: torch.Tensor, device, amp: bool, warmup: int, repeats: int):
    """One pretraining method's row: ``images`` ``[B, C, *S]`` on ``device``."""
    cfg = cfg.replace(model={"pretrain_decoder": decoder}, method={"name": name})
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.method).to(device)
    optim = pretrain_optimizer(method, cfg.train)
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = _first_linear_dtype(method.encoder)

    def step() -> torch.Tensor:
        with autocast(device, amp):
            out = method.training_step(images, 0.5, generator)
        optim.zero_grad(set_to_none=True)
        out.loss.backward()
        optim.step()
        return out.loss.detach()

    result = time_steps(step, list(method.parameters()), device, warmup, repeats)
    return {"net": name, "decoder": decoder, "autocast": dtype(), **result}


def segmentation_row(cfg, images: torch.Tensor, labels: torch.Tensor, device, amp: bool, warmup: int, repeats: int):
    """The segmentation network's fine-tuning step: ``images`` ``[B, C, *S]``, ``labels`` ``[B, 1, *S]``."""
    torch.manual_seed(0)
    model = build_segmentation_model(cfg.model).to(device)
    optim = finetune_optimizer(model, cfg.train, pretrained=False)
    loss_fn = dice_ce_loss()
    dtype = _first_linear_dtype(model)

    def step() -> torch.Tensor:
        with autocast(device, amp):
            loss = loss_fn(model(images), labels)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return loss.detach()

    result = time_steps(step, list(model.parameters()), device, warmup, repeats)
    return {"net": f"segmentation ({cfg.model.seg_arch})", "decoder": "-", "autocast": dtype(), **result}


def check(rows: list[dict[str, Any]], device: torch.device, amp: bool) -> None:
    """Fill ``vs_mae`` and ``ok`` (finite, and bf16 under autocast on a bf16 device) in place."""
    bf16 = uses_bf16(device, amp)
    mae = {r["decoder"]: r["step_s"] for r in rows if r["net"] == "mae"}
    for r in rows:
        r["vs_mae"] = r["step_s"] / mae[r["decoder"]] if r["decoder"] in mae else float("nan")
        r["ok"] = r["finite"] and (r["autocast"] in ("bfloat16", "none") if bf16 else r["autocast"] != "bfloat16")


def main(argv: list[str] | None = None) -> int:
    """Run the checks; returns the exit code (0 when every row is ok)."""
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--methods", default=",".join(METHOD_NAMES))
    p.add_argument("--decoders", default=",".join(DECODERS))
    p.add_argument("--no-amp", action="store_true", help="float32 even where bf16 autocast is available")
    p.add_argument("--out", default="results/device_check.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config value")
    args = p.parse_args(argv)
    try:
        device, amp = resolve_device(args.device), not args.no_amp
        cfg = build_config(set_overrides(args.set))
        unknown = set(args.methods.split(",")) - set(METHOD_NAMES) or set(args.decoders.split(",")) - set(DECODERS)
        if unknown:
            raise ConfigError(f"unknown method or decoder {', '.join(sorted(unknown))}")
    except ConfigError as err:
        log.error("device_check: %s", err)
        return 2
    model_cfg: ModelConfig = cfg.model
    samples = make_phantom_samples(args.batch, model_cfg.img_size, seed=0)
    images = torch.tensor(np.stack([s.image for s in samples])).to(device)  # [B, 1, *S]
    labels = torch.tensor(np.stack([s.label for s in samples]))[:, None].clamp(max=model_cfg.num_classes - 1)
    labels = labels.to(device)  # [B, 1, *S]
    log.info("device %s, bf16 autocast %s, batch %d, image %s", device, amp, args.batch, model_cfg.img_size)

    rows = []
    for decoder in args.decoders.split(","):
        for name in args.methods.split(","):
            rows.append(method_row(cfg, name, decoder, images, device, amp, args.warmup, args.repeats))
            log.info("%s", rows[-1])
    rows.append(segmentation_row(cfg, images, labels, device, amp, args.warmup, args.repeats))
    check(rows, device, amp)
    payload = {
        "benchmark": "device_check",
        "machine": machine(),
        "device": str(device),
        "bf16_supported": uses_bf16(device),
        "amp": amp,
        "batch": args.batch,
        "img_size": list(model_cfg.img_size),
        "rows": rows,
    }
    print(table(rows, COLUMNS))
    print(f"wrote {write_json(args.out, payload)}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
