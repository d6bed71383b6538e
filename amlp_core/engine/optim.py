"""Optimisers of the two phases, made in one place for the command line and the sites."""

from __future__ import annotations

import torch
from torch import nn

from amlp_core.config import TrainConfig


def pretrain_optimizer(method: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.95, as MAE) over the method's parameter groups (``param_groups()``, each
    with its ``lr_scale``; the whole module at the base rate when it has none)."""
    groups = method.param_groups() if hasattr(method, "param_groups") else [
        {"params": list(method.parameters()), "lr_scale": 1.0}]
    for group in groups:
        group.setdefault("lr", train.lr * group.get("lr_scale", 1.0))
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.95))


def finetune_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the encoder at ``encoder_lr_scale`` of the decoder's learning rate."""
    encoder = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if encoder:
        groups.append({"params": encoder, "lr_scale": train.encoder_lr_scale})
    return torch.optim.AdamW(groups, lr=train.finetune_lr, weight_decay=train.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the base learning rate; each group keeps its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
