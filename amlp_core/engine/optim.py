"""Optimisers of the two phases, made in one place for the command line and the sites."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from amlp_core.config import PrivacyConfig, TrainConfig
from amlp_core.methods.base import PretrainMethod
from amlp_core.models.segmentation import OUTPUT_LEVEL, SegmentationNet
from amlp_core.schedules import warmup_cosine

log = logging.getLogger(__name__)


def pretrain_optimizer(method: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.95, as MAE) over the method's parameter groups (``param_groups()``, each
    with its ``lr_scale``; the whole module at the base rate when it has none)."""
    groups: list[dict[str, Any]] = (
        method.param_groups()
        if isinstance(method, PretrainMethod)
        else [{"params": list(method.parameters()), "lr_scale": 1.0}]
    )
    for group in groups:
        group.setdefault("lr", train.lr * float(group.get("lr_scale", 1.0)))
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.95))


def select_trainable(model: nn.Module, which: str) -> int:
    """Freeze every parameter of ``model`` outside ``which`` (``privacy.trainable``): ``all``; ``decoder``
    (all but the encoder); ``norms_biases`` (the normalisation layers' weights and every bias);
    ``norms_biases_output`` (those and the decoder's output level, which ``train.init_decoder`` leaves fresh; the
    plain U-Net has no such level and trains its norms and biases). Fewer trained
    parameters take less of DP-SGD's noise (De et al. 2022; DP-BiTFiT). Returns the number left trainable."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm3d)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    for name, param in model.named_parameters():  # (a parameter that never trains, a fixed table, stays frozen)
        if which == "decoder":
            param.requires_grad_(param.requires_grad and not name.startswith("encoder."))
        elif which in ("norms_biases", "norms_biases_output"):
            output = which == "norms_biases_output" and name.startswith("decoder." + OUTPUT_LEVEL)
            param.requires_grad_(param.requires_grad and (name.endswith(".bias") or id(param) in norm_params or output))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


#: SGD's peak rate under site DP where it was measured (docs/results.md "Private fine-tuning", the hippocampus
#: at 160 patients and epsilon 8): the norms, biases and output layer at 0.05 (2 diverged), the decoder at 0.5.
PRIVATE_SGD_RATES = {"norms_biases_output": 0.05, "decoder": 0.5}


def private_recipe(privacy: PrivacyConfig, train: TrainConfig, pretrained: bool) -> tuple[str, str, float]:
    """What trains under site DP, with which optimiser, at which peak rate: ``privacy.trainable``,
    ``privacy.optimizer`` and ``privacy.lr`` where set, else the measured best for the start. A decoder that
    starts pretrained (``pretrained`` with ``train.init_decoder``): its norms, biases and output layer with SGD
    (39 % of the non-private Dice at epsilon 8, against 4.5 % for the decoder); an encoder alone: the decoder with
    SGD; nothing pretrained: everything with AdamW. The rate: ``privacy.lr``, else SGD's measured rate for what
    trains (:data:`PRIVATE_SGD_RATES`), else ``train.finetune_lr``."""
    trainable = privacy.trainable
    if trainable == "auto":
        trainable = "norms_biases_output" if pretrained and train.init_decoder else "decoder" if pretrained else "all"
    optimizer = privacy.optimizer
    if optimizer == "auto":
        optimizer = "adamw" if trainable == "all" else "sgd"
    rate = privacy.lr or (PRIVATE_SGD_RATES.get(trainable, 0.0) if optimizer == "sgd" else 0.0) or train.finetune_lr
    return trainable, optimizer, rate


def finetune_optimizer(
    model: nn.Module, train: TrainConfig, pretrained: bool, privacy: PrivacyConfig | None = None
) -> torch.optim.Optimizer:
    """AdamW over the segmentation network's trainable parameters.

    What comes from pretraining (the encoder, and with ``train.init_decoder`` the decoder but its
    output level) learns at ``train.encoder_lr_scale`` of the fresh part's rate, and its rate ramps
    up from 0 over the first ``train.encoder_warmup`` of fine-tuning, while the fresh part learns
    (so its first, random gradients do not wash out the pretrained features); an encoder from
    scratch is just the network's down path and learns like the rest. Under site DP (``privacy``
    with ``site_dp``): the private recipe (:func:`private_recipe`): only what it names trains
    (:func:`select_trainable`), with its optimiser (AdamW, or SGD with momentum 0.9) at its rate. Without DP
    the recipe applies where ``privacy.trainable`` is set (not ``auto``): the same recipe without clipping or
    noise, the reference a private run's utility is measured against.
    """
    private = privacy is not None and privacy.site_dp
    rate, optimizer = train.finetune_lr, "adamw"
    if privacy is not None and (private or privacy.trainable != "auto"):
        trainable, optimizer, rate = private_recipe(privacy, train, pretrained)
        count = select_trainable(model, trainable)
        what = "private fine-tuning" if private else "the private recipe without DP"
        log.info("%s: %s (%d parameters), %s at %g", what, trainable, count, optimizer, rate)
    # The plain U-Net (model.seg_arch=unet) has no encoder: one group, at the fresh rate.
    names = model.pretrained_names(pretrained and train.init_decoder) if isinstance(model, SegmentationNet) else set()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loaded = [p for n, p in trained if n in names]
    rest = [p for n, p in trained if n not in names]
    groups = [{"params": rest, "lr_scale": 1.0}] if rest else []
    if loaded:
        groups.append(
            {
                "params": loaded,
                "lr_scale": train.encoder_lr_scale if pretrained else 1.0,
                "ramp": train.encoder_warmup if pretrained else 0.0,
            }
        )
    for group in groups:
        group["peak_lr"] = rate  # set_finetune_lr's schedule peaks here
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=rate, momentum=0.9)
    return torch.optim.AdamW(groups, lr=rate, weight_decay=train.weight_decay)


def set_finetune_lr(optimizer: torch.optim.Optimizer, train: TrainConfig, progress: float) -> None:
    """The fine-tuning rates at training progress ``progress`` in [0, 1]: the peak rate (the group's
    ``peak_lr`` from :func:`finetune_optimizer`: the private recipe's rate under site DP, else
    ``train.finetune_lr``) with a linear warm-up over ``train.finetune_warmup`` then a cosine to 0, times
    each group's ``lr_scale``, and a group with a ``ramp`` (a pretrained encoder) also scaled by
    ``min(1, progress / ramp)``."""
    shape = warmup_cosine(progress, train.finetune_warmup, floor=0.0)
    for group in optimizer.param_groups:
        ramp = group.get("ramp", 0.0)
        peak = group.get("peak_lr", train.finetune_lr)
        group["lr"] = peak * shape * group.get("lr_scale", 1.0) * (min(1.0, progress / ramp) if ramp > 0 else 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the base learning rate; each group keeps its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
