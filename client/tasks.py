"""One round of work at a site: the translation between round instructions and amlp_core.

Every function here takes the site, the global weights as a state dict and the server's
instructions, and returns what may leave the site: weights and aggregate numbers.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from amlp_core.engine.device import make_generator, resolve_device, seed_everything
from amlp_core.engine.optim import finetune_optimizer, pretrain_optimizer, set_finetune_lr
from amlp_core.engine.loops import evaluate_segmentation, finetune_budget, finetune_steps, pretrain_epoch
from amlp_core.engine.pipeline import make_loader
from amlp_core.data import label_subset
from amlp_core.errors import AMLPError
from amlp_core.losses import dice_ce_loss, proximal_term
from amlp_core.methods import PretrainMethod, build_method, mask_ratio_at
from amlp_core.models import build_segmentation_model
from amlp_core.privacy import PrivatePhase, charged_training, ready_ledger
from amlp_core.schedules import federated_progress, warmup_cosine
from client.site import Site
from fedamlp import protocol as P

log = logging.getLogger(__name__)
RATIO_TOLERANCE = 1e-6


class RoundRefused(AMLPError):
    """The site will not run this round (configuration or version skew); the message says why."""


@dataclass(frozen=True)
class Instructions:
    """The server's instructions for one round, read from the message's ConfigRecord."""

    phase: str
    round: int
    total_rounds: int
    local_epochs: int
    expected_ratio: float
    digest: str
    proximal_mu: float
    local_steps: int = 0  # fine-tuning: federation.finetune_local_steps (0: local epochs over all labelled cases)

    @classmethod
    def parse(cls, record: Mapping[str, Any]) -> "Instructions":
        try:
            phase = str(record[P.PHASE])
            return cls(phase=phase, round=int(record[P.GLOBAL_ROUND]),
                       total_rounds=int(record[P.TOTAL_ROUNDS]), local_epochs=int(record[P.LOCAL_EPOCHS]),
                       expected_ratio=float(record.get(P.EXPECTED_RATIO, -1.0)), digest=str(record[P.CONFIG_DIGEST]),
                       proximal_mu=float(record.get(P.PROXIMAL_MU, 0.0)),
                       local_steps=int(record[P.LOCAL_STEPS]) if phase == P.FINETUNE else 0)
        except KeyError as e:
            raise RoundRefused(f"the server's message lacks {e.args[0]!r}: server and site versions differ") from None


def round_seed(seed: int, site: int, phase: str, round_: int) -> int:
    """A seed per (run seed, site, phase, round): a re-run round repeats exactly."""
    key = f"{seed}/{site}/{phase}/{round_}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def _check(site: Site, ins: Instructions) -> None:
    cfg, fed = site.cfg, site.cfg.federation
    if ins.digest != P.config_digest(cfg):
        raise RoundRefused(f"model/method configuration differs from the server's (digest {ins.digest} at the "
                           f"server, {P.config_digest(cfg)} here): update the site or the run config")
    planned = fed.pretrain_rounds if ins.phase == P.PRETRAIN else fed.finetune_rounds
    if (ins.total_rounds, ins.local_epochs) != (planned, fed.local_epochs):
        raise RoundRefused(f"the server plans {ins.total_rounds} {ins.phase} rounds of {ins.local_epochs} local "
                           f"epochs, this site {planned} of {fed.local_epochs}")
    if ins.phase == P.FINETUNE and ins.local_steps != fed.finetune_local_steps:
        raise RoundRefused(f"the server plans {_steps_plan(ins.local_steps)} per fine-tuning round "
                           f"(federation.finetune_local_steps={ins.local_steps}), this site "
                           f"{_steps_plan(fed.finetune_local_steps)} (federation.finetune_local_steps="
                           f"{fed.finetune_local_steps}): update the site or the run config")


def _steps_plan(steps: int) -> str:
    return f"{steps} local steps" if steps else "local epochs over all labelled cases"


def local_finetune_steps(site: Site) -> int:
    """This site's optimiser steps per fine-tuning round: ``federation.finetune_local_steps``, or
    ``local_epochs`` epochs over all its labelled training cases (before ``train.label_fraction``)."""
    cfg = site.cfg
    labelled = sum(s.label is not None for s in site.split.train)
    return finetune_budget(cfg.federation.finetune_local_steps, cfg.federation.local_epochs, labelled,
                           cfg.train.batch_size)


def site_mask_ratio(site: Site, round_: int, local_epoch: int = 0) -> float:
    """The masking ratio this site computes for a pretraining round, from the round counter alone."""
    fed = site.cfg.federation
    t = federated_progress(round_, local_epoch, fed.local_epochs, fed.pretrain_rounds)
    return mask_ratio_at(site.cfg.method, t)


def pretrain_round(site: Site, global_state: dict[str, torch.Tensor], ins: Instructions
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Local pretraining for ``local_epochs`` epochs from the global encoder.

    The masking ratio is the AMR value of the federated progress
    ``t = (round - 1 + epoch / local_epochs) / total_rounds``, constant within a local epoch, so
    every site masks alike in the same round. The site refuses the round when the ratio the
    server expects differs from its own.
    """
    _check(site, ins)
    own = site_mask_ratio(site, ins.round)
    if abs(own - ins.expected_ratio) > RATIO_TOLERANCE:
        raise RoundRefused(f"masking ratio mismatch in pretraining round {ins.round}: the server expects "
                           f"{ins.expected_ratio:.6f}, this site computes {own:.6f} (AMR schedule or version skew)")
    cfg, device = site.cfg, resolve_device(site.cfg.train.device)
    seed = round_seed(cfg.train.seed, site.index, ins.phase, ins.round)
    seed_everything(seed)
    method = build_method(cfg.model, cfg.method)
    previous = site.state.load_before(P.PRETRAIN, ins.round)
    if previous is not None:
        method.load_state_dict(previous["method"])  # decoder, running statistics (encoder replaced next)
    _load_shared(method, global_state)
    method.to(device)
    optimizer = pretrain_optimizer(method, cfg.train)
    if previous is not None:
        optimizer.load_state_dict(previous["optimizer"])
    loader = make_loader(site.split.train, cfg, augment=True, labels=False, seed=seed)
    generator = make_generator(seed, device)
    regularizer = proximal_term(method.encoder, ins.proximal_mu) if ins.proximal_mu > 0 else None
    warmup = min(cfg.train.warmup_epochs / (ins.total_rounds * ins.local_epochs), 0.5)
    metrics: dict[str, float] = {}
    with _private(site, ins, method, optimizer, loader, seed) as (opt, batches, privacy):
        for epoch in range(ins.local_epochs):
            t = federated_progress(ins.round, epoch, ins.local_epochs, ins.total_rounds)
            loader.dataset.set_epoch((ins.round - 1) * ins.local_epochs + epoch)
            # The ratio is the round's for every step (all sites alike); the rate follows the steps.
            t_next = federated_progress(ins.round, epoch + 1, ins.local_epochs, ins.total_rounds)
            metrics = pretrain_epoch(method, batches, opt, device, (t, t), generator,
                                     lr_at=lambda p: cfg.train.lr * warmup_cosine(p, warmup), amp=cfg.train.amp,
                                     desc=f"{site.name} pretrain r{ins.round}", regularizer=regularizer,
                                     lr_progress=(t, t_next))
    site.state.save(P.PRETRAIN, ins.round, {"method": method.state_dict(), "optimizer": optimizer.state_dict()})
    shared = {k: v.detach().cpu() for k, v in method.shared_state_dict().items()}
    return shared, {P.NUM_EXAMPLES: len(loader.dataset), P.UNIT_WEIGHT: 1, P.LOSS: metrics.get("loss", float("nan")),
                    P.MASK_RATIO: metrics.get("ratio", own), **privacy}


def _load_shared(method: torch.nn.Module, global_state: dict[str, torch.Tensor]) -> None:
    """Put the global weights (exactly the method's shared keys) into the local method."""
    expected = set(method.shared_state_dict())
    if set(global_state) != expected:
        missing, extra = sorted(expected - set(global_state)), sorted(set(global_state) - expected)
        raise RoundRefused(f"the global weights do not fit this site's model (missing {missing[:3]}, "
                           f"unexpected {extra[:3]}): server and site versions differ")
    method.load_state_dict(global_state, strict=False)


def finetune_round(site: Site, global_state: dict[str, torch.Tensor], ins: Instructions
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Local segmentation training from the global model, for this site's local steps
    (:func:`local_finetune_steps`), cycling over its labelled subset.

    The rate follows the steps over the whole run: step ``k`` of round ``r`` is at the federated progress
    ``(r - 1 + (k + 1/2) / steps) / total_rounds``, linear warm-up over ``train.finetune_warmup`` of it,
    then cosine to 0.
    """
    _check(site, ins)
    cfg, device = site.cfg, resolve_device(site.cfg.train.device)
    seed = round_seed(cfg.train.seed, site.index, ins.phase, ins.round)
    seed_everything(seed)
    model = _segmentation_model(site, global_state).to(device)
    optimizer = finetune_optimizer(model, cfg.train, pretrained=cfg.federation.encoder_pretrained)
    previous = site.state.load_before(P.FINETUNE, ins.round)
    if previous is not None:
        optimizer.load_state_dict(previous["optimizer"])
    subset = _labelled_subset(site)
    if not subset:
        raise RoundRefused(f"site {site.name} has no labelled training cases for fine-tuning")
    loader = make_loader(subset, cfg, augment=True, labels=True, seed=seed)
    regularizer = proximal_term(model, ins.proximal_mu) if ins.proximal_mu > 0 else None
    steps = local_finetune_steps(site)

    with _private(site, ins, model, optimizer, loader, seed) as (opt, batches, privacy):
        passes = -(-steps // len(batches))  # passes per round: each round's passes get their own augmentation
        def schedule(step: int) -> None:  # the rate follows the whole run's steps
            set_finetune_lr(opt, cfg.train, federated_progress(ins.round, step + 0.5, steps, ins.total_rounds))

        metrics = finetune_steps(model, batches, opt, dice_ce_loss(), device, steps, schedule, cfg.train.amp,
                                 desc=f"{site.name} finetune r{ins.round}", regularizer=regularizer,
                                 first_pass=(ins.round - 1) * passes)
    site.state.save(P.FINETUNE, ins.round, {"optimizer": optimizer.state_dict()})
    return ({k: v.detach().cpu() for k, v in model.state_dict().items()},
            {P.NUM_EXAMPLES: len(loader.dataset), P.UNIT_WEIGHT: 1, P.LOSS: metrics.get("loss", float("nan")),
             **privacy})


def _labelled_subset(site: Site) -> list:
    """The site's fine-tuning cases: ``train.label_fraction`` of its labelled training cases (may be empty)."""
    labelled = [s for s in site.split.train if s.label is not None]
    return label_subset(labelled, site.cfg.train.label_fraction, site.cfg.train.seed) if labelled else []


def _private_phases(site: Site, ins: Instructions) -> tuple[PrivatePhase, list[PrivatePhase]]:
    """This round's phase (its rounds from this one on) and the private phases after it, in this site's numbers."""
    cfg, fed = site.cfg, site.cfg.federation

    def phase(name: str, rounds: int) -> PrivatePhase:
        if name == P.PRETRAIN:
            return PrivatePhase(rounds, len(site.split.train), epochs=fed.local_epochs)
        return PrivatePhase(rounds, len(_labelled_subset(site)), steps=local_finetune_steps(site))

    total = fed.pretrain_rounds if ins.phase == P.PRETRAIN else fed.finetune_rounds
    now = phase(ins.phase, total - ins.round + 1)
    later = ([phase(P.FINETUNE, fed.finetune_rounds)]
             if ins.phase == P.PRETRAIN and cfg.privacy.private(P.FINETUNE) else [])
    return now, later


@contextmanager
def _private(site: Site, ins: Instructions, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             loader, seed: int) -> Iterator[tuple[Any, Any, dict[str, float]]]:
    """``(optimizer, batches, metrics)`` for one round: DP-SGD when the run asks for site DP in
    this phase, the plain ones otherwise (``metrics`` is filled after the block).

    Under DP the site's ledger is checked before any step (a round past the budget is refused:
    :class:`~amlp_core.privacy.PrivacyBudgetExceeded`), and the steps taken are recorded, on
    disk, before the weights leave the site; ``metrics`` then holds the cumulative epsilon.
    """
    p, ledger = site.cfg.privacy, None
    if p.site_dp and p.private(ins.phase):
        now, later = _private_phases(site, ins)
        ledger = ready_ledger(site.state.root, p, site.cfg.train.batch_size, now, later,
                              f"site {site.name}: {ins.phase} round {ins.round}")
        if isinstance(model, PretrainMethod):
            model.private = True
    metrics: dict[str, float] = {}  # filled once the round's steps are on the ledger
    with charged_training(model, optimizer, loader, ledger, site.cfg.train.batch_size, p.max_grad_norm, seed,
                          ins.phase, ins.round) as (opt, batches, spent):
        yield opt, batches, metrics
    if spent:
        metrics[P.EPSILON] = spent["epsilon"]


def evaluate_round(site: Site, global_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Dice per class of the global model on the site's test cases (their mean over cases only)."""
    cfg, device = site.cfg, resolve_device(site.cfg.train.device)
    if not site.split.test:
        raise RoundRefused(f"site {site.name} has no test cases to evaluate on")
    model = _segmentation_model(site, global_state).to(device)
    result = evaluate_segmentation(model, site.split.test, cfg.model.img_size, cfg.model.num_classes, device,
                                   cfg.train.amp, desc=f"{site.name} evaluate", slice_axis=cfg.data.slice_axis)
    result[P.NUM_EXAMPLES] = result.pop("num_examples")
    return result


def _segmentation_model(site: Site, global_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The run's segmentation network (``model.seg_arch``: ViT + conv decoder, or a plain U-Net) holding
    the global weights: the server sends the whole network in fine-tuning, so every key loads strictly."""
    model = build_segmentation_model(site.cfg.model)
    try:
        model.load_state_dict(global_state, strict=True)
    except RuntimeError as e:
        raise RoundRefused(f"the global segmentation model does not fit this site's model: {e}") from None
    return model
