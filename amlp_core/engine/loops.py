"""Local training and evaluation loops, used alike by the command line and the federation."""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence, Sized

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from torch import nn
from tqdm.auto import tqdm

from amlp_core import protocol as P
from amlp_core.engine.device import autocast
from amlp_core.engine.lesions import LesionTally, postprocess
from amlp_core.engine.optim import set_lr
from amlp_core.engine.semi import SemiTraining
from amlp_core.errors import TrainingError
from amlp_core.methods import PretrainMethod
from amlp_core.privacy import noise_only_step

log = logging.getLogger(__name__)


class MetricMeans:
    """Running sample-weighted means of scalar metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0

    def add(self, metrics: dict[str, float], n: int) -> None:
        for k, v in metrics.items():
            self.sums[k] += float(v) * n
        self.count += n

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def pretrain_epoch(
    method: PretrainMethod,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    progress: tuple[float, float],
    generator: torch.Generator | None = None,
    lr_at: Callable[[float], float] | None = None,
    amp: bool = True,
    desc: str = "pretrain",
    regularizer: Callable[[], torch.Tensor] | None = None,
    lr_progress: tuple[float, float] | None = None,
) -> dict[str, float]:
    """One epoch of self-supervised pretraining.

    Args:
        method: the pretext method (encoder, decoder, masking).
        loader: batches with ``"image"`` ``[B, C, *S]`` (a ``"label"`` is ignored).
        progress: training progress ``(t_start, t_end)`` in [0, 1] covered by this epoch;
            it drives the AMR masking ratio and ``lr_at`` (equal ends: one ratio all epoch).
        lr_at: learning rate as a function of progress (none: keep the optimizer's).
        lr_progress: the progress ``lr_at`` follows over the epoch's steps, when it is not
            ``progress`` (a federated round holds the ratio fixed but still warms the rate up).
        regularizer: extra loss added at every step (e.g. FedProx's proximal term).

    Returns:
        Sample-weighted mean of the step metrics, plus ``num_examples``.
    """
    method.train()
    means = MetricMeans()
    steps = max(len(loader), 1) if isinstance(loader, Sized) else 1
    t0, t1 = progress
    l0, l1 = lr_progress or progress
    bar = tqdm(loader, desc=desc, leave=False, disable=None)
    for step, batch in enumerate(bar):
        t = t0 + (t1 - t0) * step / steps
        if lr_at is not None:  # the rate at the end of the step: a warm-up's first step is not a zero step
            set_lr(optimizer, lr_at(l0 + (l1 - l0) * (step + 1) / steps))
        if batch is None:  # an empty Poisson batch of DP-SGD: still a step, of noise only
            noise_only_step(optimizer)
            continue
        images = batch["image"].to(device, non_blocking=True)
        with autocast(device, amp):
            out = method.training_step(images, t, generator)
        loss = out.loss + regularizer() if regularizer is not None else out.loss
        if not torch.isfinite(loss):  # before the step: the weights stay as they were
            raise TrainingError(f"the pretraining loss became {loss.item()} at progress {t:.3f}; the weights are kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        means.add(out.metrics, images.shape[0])
        bar.set_postfix(loss=f"{out.metrics['loss']:.4f}", ratio=f"{out.metrics.get('ratio', 0):.2f}")
    return {**means.means(), "num_examples": means.count}


def epoch_steps(num_cases: int, batch_size: int) -> int:
    """Optimiser steps of one epoch over ``num_cases`` at ``batch_size``: full batches (the loader drops
    a short last one), or one batch of all the cases when there are fewer than ``batch_size``. Poisson
    sampling (DP-SGD) takes as many steps per pass (:func:`~amlp_core.privacy.steps_per_epoch`)."""
    return max(num_cases // max(batch_size, 1), 1)


def finetune_budget(steps: int, epochs: int, num_labelled: int, batch_size: int) -> int:
    """Fine-tuning optimiser steps: ``steps`` when set (> 0), otherwise ``epochs`` epochs over all
    ``num_labelled`` labelled cases (counted before a label fraction, so that it does not shrink the budget)."""
    return steps if steps > 0 else epochs * epoch_steps(num_labelled, batch_size)


def finetune_steps(
    model: nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    steps: int,
    schedule: Callable[[int], None] | None = None,
    amp: bool = True,
    desc: str = "finetune",
    regularizer: Callable[[], torch.Tensor] | None = None,
    first_pass: int = 0,
    on_pass: Callable[[dict[str, float]], bool | None] | None = None,
    semi: SemiTraining | None = None,
) -> dict[str, float]:
    """``steps`` optimiser steps of segmentation training, cycling through ``loader``.

    Each pass over ``loader`` first calls ``loader.dataset.set_epoch(first_pass + p)`` (when the dataset
    has it), so every pass is reshuffled and re-augmented. A step is one batch drawn from the loader:
    under DP-SGD an empty Poisson batch (``None``) is a step too, of noise only, as the accountant counts it.

    Args:
        loader: ``"image"`` ``[B, C, *S]`` and ``"label"`` ``[B, 1, *S]`` int64 batches (or ``None``).
        steps: optimiser steps to take (at least 1).
        schedule: sets the optimizer's rates for step ``k`` in ``[0, steps)``, called before the step (e.g.
            :func:`~amlp_core.engine.optim.set_finetune_lr`; none: keep the optimizer's).
        regularizer: extra loss added at every step (e.g. FedProx's proximal term).
        first_pass: the augmentation epoch of the first pass (a federated round continues the count).
        on_pass: called after every pass (the last one may be partial) with that pass's mean ``loss``,
            ``num_examples``, ``pass`` (1-based, in this call) and ``step`` (steps done so far); when it
            returns True, training stops there.
        semi: the semi-supervised side (:mod:`~amlp_core.engine.semi`): every step also draws an unlabelled
            batch, the student sees both batches in one forward pass, and the unlabelled loss joins the
            supervised one at its ramped weight; the teacher follows the student after every step.

    Returns:
        Sample-weighted mean supervised ``loss`` of all the steps taken (and, semi-supervised, ``semi_loss``
        and the method's other figures), ``num_examples`` (labelled samples seen), ``steps``, ``passes``.
    """
    if steps < 1:
        raise ValueError(f"fine-tuning needs at least one step, got {steps}")
    model.train()
    total, done, passes = MetricMeans(), 0, 0
    dataset = getattr(loader, "dataset", None)
    bar = tqdm(total=steps, desc=desc, leave=False, disable=None)
    try:
        while done < steps:
            set_epoch = getattr(dataset, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(first_pass + passes)
            means, drawn = MetricMeans(), 0
            for batch in loader:
                drawn += 1
                if schedule is not None:
                    schedule(done)
                if batch is None:  # an empty Poisson batch of DP-SGD: still a step, of noise only
                    noise_only_step(optimizer)
                else:
                    images = batch["image"].to(device, non_blocking=True)  # [B, C, *S]
                    labels = batch["label"].to(device, non_blocking=True)  # [B, 1, *S]
                    if semi is None:
                        with autocast(device, amp):
                            logits = model(images)  # [B, K, *S]
                        loss = loss_fn(logits.float(), labels)
                        full, figures = loss, {"loss": loss.item()}
                    elif "labelled" in batch:  # DP-SGD: one Poisson batch of both kinds of records
                        flags = batch["labelled"].to(device).bool()
                        full, loss, figures = _record_loss(
                            model, images, labels, flags, loss_fn, semi, done, device, amp
                        )
                    else:
                        full, loss, figures = _semi_loss(model, images, labels, loss_fn, semi, done, device, amp)
                    if regularizer is not None:
                        full = full + regularizer()
                    if not torch.isfinite(full):  # before the step: the weights stay as they were
                        raise TrainingError(
                            f"the segmentation loss became {full.item()} at step {done + 1}; the weights are kept"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    full.backward()
                    optimizer.step()
                    if semi is not None:
                        semi.objective.after_step(model)
                    means.add(figures, images.shape[0])
                    total.add(figures, images.shape[0])
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                done += 1
                bar.update(1)
                if done >= steps:
                    break
            if not drawn:
                raise ValueError("the fine-tuning loader yields no batch")
            passes += 1
            if on_pass is not None and on_pass(
                {**means.means(), "num_examples": means.count, "pass": passes, "step": done}
            ):
                break
    finally:
        bar.close()
    return {**total.means(), "num_examples": total.count, "steps": done, "passes": passes}


def _semi_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: nn.Module,
    semi: SemiTraining,
    step: int,
    device: torch.device,
    amp: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One semi-supervised step's loss: ``(supervised + w * unlabelled, supervised, figures)``."""
    if semi.stream is None:
        semi.stream = semi.batches()
    unlabelled = next(semi.stream).to(device, non_blocking=True)  # [U, C, *S]
    with autocast(device, amp):
        pair = (images, labels) if semi.objective.needs_labelled else None
        target = semi.objective.views(unlabelled, pair)  # the teacher's targets (no gradient)
        logits = model(torch.cat([images, target.images]))  # [B + U, K, *S]
    n = images.shape[0]
    loss = loss_fn(logits[:n].float(), labels)
    loss_u, figures = semi.objective.loss(logits[n:], target)
    weight = semi.objective.weight(semi.progress_at(step))
    return loss + weight * loss_u, loss, {"loss": loss.item(), **figures, "semi_weight": weight}


def _record_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    labelled: torch.Tensor,
    loss_fn: nn.Module,
    semi: SemiTraining,
    step: int,
    device: torch.device,
    amp: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """A semi-supervised step's loss under DP-SGD, where a Poisson batch mixes labelled and unlabelled
    records (``labelled`` ``[B]`` bool): the mean over the batch of each record's own loss, supervised or
    unlabelled (so that per-record clipping bounds each record's part). Returns ``(loss, supervised, figures)``.
    """
    n, unlabelled = images.shape[0], ~labelled
    inputs, target = images, None
    if unlabelled.any():
        with autocast(device, amp):
            target = semi.objective.views(images[unlabelled])  # per record: no CutMix under DP (the config)
        inputs = images.clone()
        inputs[unlabelled] = target.images.to(images.dtype)
    with autocast(device, amp):
        logits = model(inputs)  # [B, K, *S]
    supervised = logits.sum() * 0.0
    if labelled.any():  # the loss's mean over the labelled records, times their share of the batch
        supervised = loss_fn(logits[labelled].float(), labels[labelled])
    total = supervised * labelled.sum() / n
    weight = semi.objective.weight(semi.progress_at(step))
    figures = {"loss": supervised.item(), "semi_weight": weight}
    if target is not None:
        per_record, more = semi.objective.loss(logits[unlabelled], target, per_case=True)  # [U]
        total = total + weight * per_record.sum() / n
        figures.update(more)
    return total, supervised, figures


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    roi_size: Sequence[int],
    device: torch.device,
    amp: bool = True,
    batch_size: int = 4,
    slice_axis: int = -1,
    flips: bool = False,
) -> torch.Tensor:
    """Segment one whole image of any size by sliding windows of ``roi_size``.

    A 3D image given to a 2D model (``len(roi_size) == 2``) is segmented slice by slice
    along the spatial axis ``slice_axis``. With ``flips`` (test-time augmentation) the image is also
    segmented mirrored along every combination of its spatial axes (2**dims passes, as nnU-Net
    mirrors) and the probabilities are averaged.

    Args:
        image: ``[C, *S]`` normalised intensities.

    Returns:
        Class probabilities ``[K, *S]`` (float32, on the CPU).
    """
    image = torch.as_tensor(image, dtype=torch.float32)
    if image.ndim - 1 == len(roi_size) + 1:
        axis = slice_axis % (image.ndim - 1) + 1  # spatial axis -> axis of [C, *S]
        slices = [
            predict_volume(model, image.select(axis, k), roi_size, device, amp, batch_size, flips=flips)
            for k in range(image.shape[axis])
        ]
        return torch.stack(slices, dim=axis)  # [K, *S]
    if image.ndim - 1 != len(roi_size):
        raise ValueError(f"a {image.ndim - 1}D image cannot be segmented by a {len(roi_size)}D model")
    model.eval()
    x = image.unsqueeze(0).to(device)  # [1, C, *S]
    spatial = list(range(2, x.ndim))
    mirrors = [list(c) for n in range(len(spatial) + 1) for c in itertools.combinations(spatial, n)] if flips else [[]]
    total = None
    for axes in mirrors:
        view = x.flip(axes) if axes else x
        with autocast(device, amp):
            logits = sliding_window_inference(
                view,
                tuple(roi_size),
                batch_size,
                model,
                overlap=0.5,
                mode="gaussian",
                padding_mode="constant",
                cval=float(x.min()),
            )
        assert isinstance(logits, torch.Tensor)  # one output head
        probs = torch.softmax(logits.float(), dim=1)
        probs = probs.flip(axes) if axes else probs
        total = probs if total is None else total + probs
    assert total is not None
    return (total / len(mirrors))[0].cpu()


def evaluate_segmentation(
    model: nn.Module,
    samples: Sequence,
    roi_size: Sequence[int],
    num_classes: int,
    device: torch.device,
    amp: bool = True,
    desc: str = "evaluate",
    slice_axis: int = -1,
    keep_largest: bool = False,
    min_share: float = 0.0,
    min_confidence: float = 0.0,
    flips: bool = False,
) -> dict[str, float]:
    """Dice per foreground class on whole images (MONAI ``DiceMetric``), and the lesion metrics
    (:class:`~amlp_core.engine.lesions.LesionTally`), after the post-processing ``keep_largest`` /
    ``min_share`` / ``min_confidence`` (:func:`~amlp_core.engine.lesions.postprocess`); ``flips``:
    test-time mirroring (:func:`predict_volume`).

    Args:
        samples: objects with ``image`` ``[C, *S]`` and ``label`` ``[*S]``.

    Returns:
        ``{"dice_1": ..., "dice_K-1": ..., "dice_mean": ..., "num_examples": n}`` and
        :data:`~amlp_core.engine.lesions.LESION_KEYS`; a class absent from both the truth and the
        prediction of a case is left out of that class's mean.
    """
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, num_classes=num_classes)
    lesions, start = LesionTally(), time.monotonic()
    for sample in tqdm(samples, desc=desc, leave=False, disable=None):
        probs = predict_volume(
            model, sample.image, roi_size, device, amp, slice_axis=slice_axis, flips=flips
        )  # [K, *S]
        p = probs.numpy()
        pred = postprocess(p.argmax(0), num_classes, keep_largest, min_share, min_confidence, p)  # [*S]
        metric(torch.from_numpy(pred)[None, None], torch.as_tensor(sample.label).long()[None, None])  # [1, 1, *S]
        lesions.add(pred, sample.label)
    aggregated = metric.aggregate()
    assert isinstance(aggregated, torch.Tensor)
    per_class = aggregated.tolist()  # [K-1]
    out = {f"dice_{k + 1}": float(v) for k, v in enumerate(per_class)}
    out[P.DICE_MEAN] = float(np.nanmean(per_class)) if per_class else float("nan")
    out.update(lesions.metrics())
    out["num_examples"] = len(samples)
    log.info("%s: %d cases in %.1f s", desc, len(samples), time.monotonic() - start)
    return out
