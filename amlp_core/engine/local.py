"""Local training: one engine for a site's federated round and for a run on one machine.

The command line (:mod:`amlp_core.engine.pipeline`) and the ClientApp (:mod:`client.tasks`) train through
these functions; they differ only in where the weights come from and where they go.

- :func:`pretrain_epochs`: epochs of self-supervised pretraining at given places of the run's schedule
  (the AMR ratio and the learning rate follow the place);
- :func:`finetune_for`: optimiser steps of segmentation training (Dice + CE), the rate following the
  run's schedule;
- :func:`pretrain_round` / :func:`finetune_round`: one federated round at a site, from the global
  weights and what the site kept of its last round.

Each trains with DP-SGD when given a ledger (:func:`~amlp_core.privacy.ready_ledger`, checked against the
budget before any step), and charges the steps taken to it before returning: whatever calls these
functions cannot train privately and forget the ledger, or train on a private config without DP.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from amlp_core.config import Config
from amlp_core.data import Sample, SegDataset
from amlp_core.data.dataset import RecordDataset, record_count
from amlp_core.engine.device import make_generator, resolve_device, seed_everything
from amlp_core.engine.loops import finetune_steps, pretrain_epoch
from amlp_core.engine.optim import finetune_optimizer, pretrain_optimizer, set_finetune_lr
from amlp_core.engine.semi import SemiObjective, SemiTraining, unlabelled_pool
from amlp_core.errors import AMLPError
from amlp_core.losses import dice_ce_loss, proximal_term
from amlp_core.methods import PretrainMethod, build_method
from amlp_core.models import build_segmentation_model
from amlp_core.privacy import PrivacyLedger, charged_training
from amlp_core.schedules import warmup_cosine

log = logging.getLogger(__name__)


class WeightsMismatch(AMLPError, ValueError):
    """Weights that arrived (a global model) do not fit the model configured here; the message says how."""


@dataclass(frozen=True)
class Epoch:
    """One pretraining epoch's place in its run: ``index`` (reshuffles and re-augments the cases) and the
    training progress ``start``..``end`` in [0, 1] it covers."""

    index: int
    start: float
    end: float


def run_epochs(first: int, last: int, total: int) -> list[Epoch]:
    """Epochs ``first``..``last - 1`` of a run of ``total`` epochs (progress ``e / total``)."""
    return [Epoch(e, e / total, (e + 1) / total) for e in range(first, last)]


@dataclass(frozen=True)
class Stretch:
    """One stretch of training, as the privacy ledger counts it: a site's federated round, or an epoch (a
    whole fine-tuning) of a local run. ``phase`` and ``number`` name it on the ledger (and number the
    augmentation passes of a federated round's fine-tuning); ``seed`` seeds its randomness; with ``ledger``
    it is DP-SGD; ``regularizer`` is added to every step's loss (FedProx's term); ``desc`` names the bar."""

    phase: str
    number: int = 1
    seed: int = 0
    ledger: PrivacyLedger | None = None
    regularizer: Callable[[], torch.Tensor] | None = None
    desc: str = ""

    @property
    def name(self) -> tuple[str, int]:
        """``(phase, number)``: the stretch on the privacy ledger."""
        return self.phase, self.number


def pretrain_epochs(
    method: PretrainMethod,
    optimizer: torch.optim.Optimizer,
    loader,
    device: torch.device,
    cfg: Config,
    epochs: Sequence[Epoch],
    generator: torch.Generator,
    stretch: Stretch,
    *,
    total_epochs: int,
    hold_ratio: bool = False,
) -> dict[str, float]:
    """Pretrain ``method`` for ``epochs`` of a run of ``total_epochs`` (one ``stretch`` of training).

    The rate is ``train.lr`` with a warm-up over ``train.warmup_epochs`` (at most half the run) and a
    cosine, following each step's progress. The AMLP/AHM masking ratio follows the progress too, or
    with ``hold_ratio`` stays each epoch's start value (a federated round: every site masks alike).
    With the stretch's ledger: DP-SGD at the ledger's noise, the steps recorded as the stretch.

    Returns:
        The last epoch's mean step metrics, ``num_examples``, and ``epsilon`` when private.
    """
    warmup = min(cfg.train.warmup_epochs / total_epochs, 0.5)
    ledger, seed = stretch.ledger, stretch.seed
    if method.private != (ledger is not None):  # statistics of the cases stay frozen under DP
        raise ValueError(f"a method built with private={method.private} trained {'with' if ledger else 'without'} DP")
    metrics: dict[str, float] = {}
    with charged_training(
        method, optimizer, loader, ledger, cfg.train.batch_size, cfg.privacy, seed, *stretch.name
    ) as (opt, batches, spent):
        for epoch in epochs:
            batches.dataset.set_epoch(epoch.index)  # (under DP: the records, which pick a slice per epoch)
            ratio_at = (epoch.start, epoch.start) if hold_ratio else (epoch.start, epoch.end)
            metrics = pretrain_epoch(
                method,
                batches,
                opt,
                device,
                ratio_at,
                generator,
                lr_at=lambda t: cfg.train.lr * warmup_cosine(t, warmup),
                amp=cfg.train.amp,
                desc=f"{stretch.desc or stretch.phase} {epoch.index + 1}/{total_epochs}",
                regularizer=stretch.regularizer,
                lr_progress=(epoch.start, epoch.end),
            )
    return {**metrics, **spent}


def finetune_for(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    device: torch.device,
    cfg: Config,
    steps: int,
    progress_at: Callable[[int], float],
    stretch: Stretch,
    *,
    on_pass: Callable[[dict[str, Any]], bool | None] | None = None,
    semi: SemiTraining | None = None,
    first_pass: int | None = None,
) -> dict[str, Any]:
    """``steps`` optimiser steps of Dice + CE training of ``model`` over ``loader``'s cases (one ``stretch``),
    with ``semi`` (:func:`semi_training`) the unlabelled pool's loss too.

    The rate of step ``k`` is :func:`~amlp_core.engine.optim.set_finetune_lr` at ``progress_at(k)``.
    The passes over the cases continue the numbering of the earlier stretches (the stretch's number: every
    round's passes get their own shuffle and augmentation), or start at ``first_pass`` (a resumed run). With
    the stretch's ledger: DP-SGD, a step is one Poisson draw, and the steps are recorded as the stretch.

    Under DP-SGD with ``semi``, the records are the labelled cases and the unlabelled pool together
    (:class:`~amlp_core.data.dataset.RecordDataset`): Poisson sampling draws from both, each record's loss
    is clipped alone, and the ledger counts them all (plan it with :func:`finetune_records`).

    Returns:
        :func:`~amlp_core.engine.loops.finetune_steps`' metrics, and ``epsilon`` when private.
    """
    ledger, seed = stretch.ledger, stretch.seed
    if ledger is not None and semi is not None:
        pool = semi.loader.dataset
        assert isinstance(pool, SegDataset)  # (semi_training's)
        loader = DataLoader(RecordDataset(loader.dataset, pool))  # (only its dataset is used)
    with charged_training(model, optimizer, loader, ledger, cfg.train.batch_size, cfg.privacy, seed, *stretch.name) as (
        opt,
        batches,
        spent,
    ):
        passes = -(-steps // max(len(batches), 1))  # passes per stretch

        def schedule(step: int) -> None:
            set_finetune_lr(opt, cfg.train, progress_at(step))

        metrics = finetune_steps(
            model,
            batches,
            opt,
            dice_ce_loss(),
            device,
            steps,
            schedule,
            cfg.train.amp,
            desc=stretch.desc or stretch.phase,
            regularizer=stretch.regularizer,
            first_pass=(stretch.number - 1) * passes if first_pass is None else first_pass,
            on_pass=on_pass,
            semi=semi,
        )
    return {**metrics, **spent}


def finetune_records(cfg: Config, train: list[Sample], subset: list[Sample]) -> int:
    """The records (patients) a fine-tuning stretch learns from, as DP-SGD samples and the ledger counts them:
    those of the labelled ``subset``, and with ``train.semi_supervised`` of the unlabelled pool beyond it."""
    semi = cfg.train.semi_supervised != "none"
    return record_count([*subset, *(unlabelled_pool(train, subset) if semi else [])])


def semi_training(
    cfg: Config,
    model: nn.Module,
    train: list[Sample],
    subset: list[Sample],
    seed: int,
    progress_at: Callable[[int], float],
    first_pass: int = 0,
    teacher: dict[str, torch.Tensor] | None = None,
) -> SemiTraining | None:
    """The semi-supervised side of a fine-tuning stretch of ``model`` (on its device), or None when
    ``train.semi_supervised=none`` or the unlabelled pool of ``train`` beyond ``subset`` is empty (the
    stretch trains supervised, and the log says why).

    The unlabelled batches (``train.semi_batch`` cases, else ``train.batch_size``) are the weak view: the
    crop and flips only (:mod:`~amlp_core.engine.semi` perturbs them). The teacher starts as ``model``, or
    holds ``teacher`` (a kept teacher's weights).
    """
    t = cfg.train
    if t.semi_supervised == "none":
        return None
    pool = unlabelled_pool(train, subset)
    if not pool:
        log.warning(
            "train.semi_supervised=%s: no unlabelled case here, so fine-tuning is supervised only", t.semi_supervised
        )
        return None
    weak = cfg.replace(train={"batch_size": t.semi_batch or t.batch_size, "augment": "flip"})
    loader = make_loader(pool, weak, augment=True, labels=False, seed=seed + 1)
    device = next(model.parameters()).device
    objective = SemiObjective(t, model, make_generator(seed + 2, device))
    if teacher is not None:
        objective.teacher.load_state_dict(teacher)
    log.info("semi-supervised (%s): %d unlabelled cases beside %d labelled", t.semi_supervised, len(pool), len(subset))
    return SemiTraining(objective, loader, progress_at, first_pass)


def make_loader(samples: list[Sample], cfg: Config, augment: bool, labels: bool, seed: int | None = None) -> DataLoader:
    """Shuffled batches of ``model.img_size`` crops (seeded by ``seed``, else ``train.seed``); without
    ``labels`` the labels are dropped."""
    seed = cfg.train.seed if seed is None else seed
    if not labels:
        samples = [dataclasses.replace(s, label=None) for s in samples]
    dataset = SegDataset(
        samples,
        cfg.model.img_size,
        augment=augment,
        seed=seed,
        strength=cfg.train.augment,
        foreground_share=cfg.train.foreground_share,
    )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=min(cfg.train.batch_size, len(dataset)),
        shuffle=True,
        drop_last=len(dataset) >= cfg.train.batch_size,
        generator=generator,
    )


@dataclass(frozen=True)
class Round:
    """A federated round as a site trains it: its number of ``total``, the seed of its randomness, the
    ledger when the round is private, FedProx's ``proximal_mu`` and the progress bar's name."""

    number: int
    total: int
    seed: int
    ledger: PrivacyLedger | None = None
    proximal_mu: float = 0.0
    desc: str = "round"


def pretrain_round(
    cfg: Config,
    cases: list[Sample],
    shared: dict[str, torch.Tensor],
    kept: dict | None,
    epochs: Sequence[Epoch],
    rnd: Round,
) -> tuple[dict[str, torch.Tensor], dict, dict[str, float]]:
    """One federated pretraining round at a site: the method from ``kept`` (the site's state of its last
    round: method and optimizer, or None) with the global ``shared`` weights put in, trained for
    ``epochs`` of the run's ``rnd.total`` rounds' schedule with the ratio held per epoch.

    Returns:
        ``(shared weights out, state to keep, metrics)``; metrics hold ``loss``, ``ratio``,
        ``num_examples`` and, under DP, ``epsilon``.

    Raises:
        WeightsMismatch: ``shared`` is not exactly the method's shared weights.
    """
    device = resolve_device(cfg.train.device)
    seed_everything(rnd.seed)
    method = build_method(cfg.model, cfg.method, private=rnd.ledger is not None)
    if kept is not None:
        method.load_state_dict(kept["method"])  # decoder, running statistics (the encoder is replaced next)
    expected = set(method.shared_state_dict())
    if set(shared) != expected:
        missing, extra = sorted(expected - set(shared)), sorted(set(shared) - expected)
        raise WeightsMismatch(
            f"the global weights do not fit this site's model (missing {missing[:3]}, "
            f"unexpected {extra[:3]}): server and site versions differ"
        )
    method.load_state_dict(shared, strict=False)
    method.to(device)
    optimizer = pretrain_optimizer(method, cfg.train)
    if kept is not None:
        optimizer.load_state_dict(kept["optimizer"])
    loader = make_loader(cases, cfg, augment=True, labels=False, seed=rnd.seed)
    regularizer = proximal_term(method.encoder, rnd.proximal_mu) if rnd.proximal_mu > 0 else None
    per_round = len(epochs)
    metrics = pretrain_epochs(
        method,
        optimizer,
        loader,
        device,
        cfg,
        epochs,
        make_generator(rnd.seed, device),
        Stretch("pretrain", rnd.number, rnd.seed, rnd.ledger, regularizer, rnd.desc),
        total_epochs=rnd.total * per_round,
        hold_ratio=True,
    )
    out = {k: v.detach().cpu() for k, v in method.shared_state_dict().items()}
    return out, {"method": method.state_dict(), "optimizer": optimizer.state_dict()}, metrics


def finetune_round(
    cfg: Config,
    cases: list[Sample],
    global_state: dict[str, torch.Tensor],
    kept: dict | None,
    steps: int,
    rnd: Round,
    pretrained: bool,
    train: list[Sample] | None = None,
) -> tuple[dict[str, torch.Tensor], dict, dict[str, float]]:
    """One federated fine-tuning round at a site: the global segmentation network (every key, strictly),
    the optimizer from ``kept``, ``steps`` steps over the site's labelled ``cases``. Step ``k`` of round
    ``r`` sits at the run's progress ``(r - 1 + (k + 1/2) / steps) / total``.

    With ``train.semi_supervised``, the site's unlabelled pool (its training cases ``train`` beyond
    ``cases``) joins the loss (:func:`semi_training`). The teacher stays at the site: it starts each round
    as the global model (``train.semi_teacher_start=global``) or as the site kept it (``keep``).

    Returns:
        ``(network weights out, state to keep, metrics)``; metrics as :func:`finetune_for`'s.

    Raises:
        WeightsMismatch: ``global_state`` does not fit the configured network.
    """
    device = resolve_device(cfg.train.device)
    seed_everything(rnd.seed)
    model = segmentation_model(cfg, global_state).to(device)
    optimizer = finetune_optimizer(model, cfg.train, pretrained=pretrained, privacy=cfg.privacy)
    if kept is not None:
        optimizer.load_state_dict(kept["optimizer"])
    loader = make_loader(cases, cfg, augment=True, labels=True, seed=rnd.seed)
    regularizer = proximal_term(model, rnd.proximal_mu) if rnd.proximal_mu > 0 else None

    def progress_at(k: int) -> float:
        return (rnd.number - 1 + (k + 0.5) / steps) / rnd.total

    kept_teacher = kept.get("teacher") if kept is not None and cfg.train.semi_teacher_start == "keep" else None
    semi = semi_training(cfg, model, train or [], cases, rnd.seed, progress_at, teacher=kept_teacher)
    metrics = finetune_for(
        model,
        optimizer,
        loader,
        device,
        cfg,
        steps,
        progress_at,
        Stretch("finetune", rnd.number, rnd.seed, rnd.ledger, regularizer, rnd.desc),
        semi=semi,
    )
    out = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state: dict[str, Any] = {"optimizer": optimizer.state_dict()}
    if semi is not None:
        state["teacher"] = {k: v.detach().cpu() for k, v in semi.objective.teacher.state_dict().items()}
    metrics["semi_unlabelled"] = semi.unlabelled if semi is not None else 0
    return out, state, metrics


def segmentation_model(cfg: Config, state: dict[str, torch.Tensor]) -> nn.Module:
    """The configured segmentation network holding ``state`` (every key, strictly).

    Raises:
        WeightsMismatch: ``state`` does not fit it.
    """
    model = build_segmentation_model(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsMismatch(f"the global segmentation model does not fit this site's model: {e}") from None
    return model
