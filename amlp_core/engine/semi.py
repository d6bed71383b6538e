"""Semi-supervised fine-tuning: a site's unlabelled cases enter the segmentation loss (issue 27).

Every fine-tuning step draws a batch of the site's labelled subset and, with ``train.semi_supervised``,
a batch of its *unlabelled pool* (:func:`unlabelled_pool`: every training case whose label is not used).
A teacher, the exponential moving average of the student (:class:`Teacher`), looks at the unlabelled
batch; the student learns to agree with it under perturbation. The methods:

- ``mean_teacher`` (Tarvainen & Valpola 2017; SSL4MIS's form): each network sees the batch with its own
  gaussian noise; the loss is the mean squared difference of their class probabilities. With
  ``train.semi_view=strong`` the teacher sees the batch as it comes and the student fixmatch's strong view
  of it (CutMix included, the teacher's probabilities moved with the boxes): UniMatch's perturbation with
  the mean teacher's soft target.
- ``fixmatch`` (Sohn et al. 2020, in UniMatch's segmentation form): the teacher's argmax on the weak view
  (the loader's crop and flips) is a pseudo-label where its probability reaches ``train.semi_threshold``;
  the student sees a strong view (contrast, brightness, noise, blur, and with probability
  ``train.semi_cutmix`` a box of another unlabelled case, pseudo-label and all) and is trained on those
  pixels with cross-entropy + Dice.
- ``copy_paste`` (BCP, Bai et al. CVPR 2023): each unlabelled image is paired with a labelled one of the
  batch, and a box (``train.semi_paste`` of each side) of one is pasted into the other, in both directions
  (labelled into unlabelled for even pairs, unlabelled into labelled for odd ones). The student learns the
  mixed image against the ground truth where the pixels are labelled and the teacher's argmax where they
  are not (those pixels weighted ``train.semi_paste_weight``), with cross-entropy + Dice. Unlike BCP the
  plain supervised loss stays beside it and there is no separate warm-up (the weight's ramp is it).

The total loss is ``supervised + w(t) * unlabelled``, with ``w`` ramped up (sigmoid, Laine & Aila) to
``train.semi_weight`` over ``train.semi_rampup`` of the run. One forward pass of the student takes the
labelled and the unlabelled images together. Every constant is a ``train.semi_*`` config value.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from amlp_core.config import TrainConfig
from amlp_core.config.schema import SEMI_METHODS
from amlp_core.data import Sample


def unlabelled_pool(train: Sequence[Sample], subset: Sequence[Sample]) -> list[Sample]:
    """A site's unlabelled pool: its training cases whose label fine-tuning does not use (unlabelled
    cases, and labelled ones outside ``train.label_fraction``'s ``subset``). Test cases are never in
    ``train``, so never here."""
    used = {s.name for s in subset}
    return [dataclasses.replace(s, label=None) for s in train if s.name not in used]


def rampup(progress: float, length: float) -> float:
    """Sigmoid ramp-up ``exp(-5 (1 - t)^2)`` with ``t = progress / length``, 1 beyond ``length`` (0: none)."""
    if length <= 0:
        return 1.0
    t = min(max(progress / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class Teacher:
    """The exponential moving average of a student network, kept out of autograd.

    ``momentum`` 0 makes the teacher the student itself (FixMatch's original form): :meth:`update` copies.
    """

    def __init__(self, student: nn.Module, momentum: float):
        self.momentum = momentum
        self.net = copy.deepcopy(student)
        self.net.requires_grad_(False)
        self.net.eval()

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """``teacher = m * teacher + (1 - m) * student`` (buffers copied)."""
        for mine, theirs in zip(self.net.parameters(), student.parameters(), strict=True):
            mine.lerp_(theirs.detach().to(mine.dtype), 1.0 - self.momentum)
        for buf, their_buf in zip(self.net.buffers(), student.buffers(), strict=True):
            buf.copy_(their_buf)

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, K, *S]`` (float32) of images ``[B, C, *S]``."""
        self.net.eval()
        return torch.softmax(self.net(images).float(), dim=1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state, strict=True)


def _uniform(n: int, low: float, high: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``n`` uniform draws in ``[low, high)``, shaped ``[n, 1, 1, ...]`` to broadcast over ``like``."""
    u = torch.rand(n, generator=generator, device=generator.device)
    return (low + (high - low) * u).to(like.dtype).view(n, *([1] * (like.ndim - 1)))


def strong_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Intensity perturbation that keeps every pixel where it is (so a pseudo-label still fits):
    contrast x[0.65, 1.5] about the mean, brightness +-0.2, gaussian noise of std up to 0.1, and a
    3-wide box blur with probability 0.2; each drawn per image.

    Args:
        images: ``[B, C, *S]`` normalised intensities (on ``generator``'s device).

    Returns:
        ``[B, C, *S]``.
    """
    b, dims = images.shape[0], images.ndim - 2
    mean = images.mean(dim=tuple(range(2, images.ndim)), keepdim=True)
    x = (images - mean) * _uniform(b, 0.65, 1.5, generator, images) + mean
    x = x + _uniform(b, -0.2, 0.2, generator, images)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    x = x + noise * _uniform(b, 0.0, 0.1, generator, images)
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    blurred = pool(x, 3, stride=1, padding=1, count_include_pad=False)
    blur = (torch.rand(b, generator=generator, device=generator.device) < 0.2).view(b, *([1] * (x.ndim - 1)))
    return torch.where(blur, blurred, x)


def cutmix_boxes(
    shape: Sequence[int], probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each image of a batch takes another's pixels (CutMix): for every image, with ``probability``,
    one axis-aligned box covering 2-40 % of it (its sides in the image's proportions).

    Args:
        shape: the batch's ``[B, C, *S]``.

    Returns:
        ``(partner [B] int64, box [B, 1, *S] bool)``: image ``i`` takes ``partner[i]``'s pixels inside ``box[i]``.
    """
    b, spatial = shape[0], list(shape[2:])
    device = generator.device
    partner = torch.randperm(b, generator=generator, device=device)
    box = torch.zeros((b, 1, *spatial), dtype=torch.bool, device=device)
    draws = torch.rand(b, 2 + len(spatial), generator=generator, device=device).tolist()
    for i, (use, area, *where) in enumerate(draws):
        if use >= probability or b < 2:
            continue
        side = (0.02 + 0.38 * area) ** (1.0 / len(spatial))  # the box's share of each side
        sizes = [max(1, round(side * n)) for n in spatial]
        starts = [int(w * (n - s + 1)) for w, n, s in zip(where, spatial, sizes, strict=True)]
        where_box = tuple(slice(a, a + s) for a, s in zip(starts, sizes, strict=True))
        box[i, 0][where_box] = True
    return partner, box


def paste_boxes(shape: Sequence[int], share: float, generator: torch.Generator) -> torch.Tensor:
    """One box per image, ``share`` of each side, at a random place (BCP's copy-paste mask).

    Args:
        shape: the batch's ``[B, C, *S]``.

    Returns:
        ``[B, 1, *S]`` bool, True inside each image's box.
    """
    b, spatial = shape[0], list(shape[2:])
    device = generator.device
    box = torch.zeros((b, 1, *spatial), dtype=torch.bool, device=device)
    sizes = [max(1, round(share * n)) for n in spatial]
    draws = torch.rand(b, len(spatial), generator=generator, device=device).tolist()
    for i, where in enumerate(draws):
        starts = [int(w * (n - s + 1)) for w, n, s in zip(where, spatial, sizes, strict=True)]
        box[i, 0][tuple(slice(a, a + s) for a, s in zip(starts, sizes, strict=True))] = True
    return box


def masked_dice_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    keep: torch.Tensor,
    eps: float = 1e-5,
    per_case: bool = False,
    dice: bool = True,
) -> torch.Tensor:
    """Cross-entropy + soft Dice (foreground classes) over the pixels ``keep`` only.

    Args:
        logits: ``[B, K, *S]``; target: int64 ``[B, *S]``; keep: float ``[B, *S]`` (0/1 weights).
        per_case: one loss per case, from that case's pixels alone (DP-SGD clips each case's gradient,
            so no case's loss may depend on another's); else one over the batch's pixels together.
        dice: with the Dice term (``train.semi_loss=ce_dice``); else cross-entropy alone (``ce``).

    Returns:
        ``(CE + Dice) / 2`` (or CE): a scalar, or ``[B]`` per case; 0 where no pixel is kept.
    """
    spatial = tuple(range(1, target.ndim))  # [*S] of each case
    pixels = (0, *spatial) if not per_case else spatial
    kept = keep.sum(pixels)  # [] or [B]
    ce = (F.cross_entropy(logits, target, reduction="none") * keep).sum(pixels) / kept.clamp_min(1.0)
    if not dice:
        return ce
    probs = torch.softmax(logits, dim=1)[:, 1:]  # [B, K-1, *S]
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)  # [B, K-1, *S]
    w = keep.unsqueeze(1)
    axes = (0, *range(2, probs.ndim)) if not per_case else tuple(range(2, probs.ndim))  # one Dice per class
    inter = (probs * onehot * w).sum(axes)
    denom = ((probs + onehot) * w).sum(axes)
    soft_dice = 1.0 - (2.0 * inter + eps) / (denom + eps)  # [K-1] or [B, K-1]
    return torch.where(kept > 0, (ce + soft_dice.mean(-1)) / 2.0, torch.zeros_like(ce))


@dataclass
class Unlabelled:
    """What the student sees of an unlabelled batch and what it must match there."""

    images: torch.Tensor  # [B, C, *S] the student's view
    soft: torch.Tensor | None = None  # [B, K, *S] the teacher's probabilities (mean teacher)
    pseudo: torch.Tensor | None = None  # [B, *S] int64 the teacher's pseudo-labels (fixmatch)
    keep: torch.Tensor | None = None  # [B, *S] float: the pixels confident enough (fixmatch)


class SemiObjective:
    """``train.semi_supervised``'s loss on an unlabelled batch, with its teacher.

    Use: ``u = objective.views(images_u)`` (the teacher's targets, no gradient), one student forward of
    ``torch.cat([images_l, u.images])``, ``objective.loss(logits_u, u)``, the optimiser step, then
    ``objective.after_step(student)`` (the teacher's EMA).
    """

    def __init__(self, train: TrainConfig, student: nn.Module, generator: torch.Generator):
        if train.semi_supervised not in SEMI_METHODS[1:]:
            raise ValueError(f"no semi-supervised objective for train.semi_supervised={train.semi_supervised!r}")
        self.method = train.semi_supervised
        self.train = train
        self.teacher = Teacher(student, train.semi_ema)
        self.generator = generator

    def weight(self, progress: float) -> float:
        """The unlabelled loss's weight at training progress ``progress`` in [0, 1]."""
        return self.train.semi_weight * rampup(progress, self.train.semi_rampup)

    @property
    def needs_labelled(self) -> bool:
        """Whether :meth:`views` mixes the labelled batch in (``copy_paste``: never under DP, the config says)."""
        return self.method == "copy_paste"

    def views(self, images: torch.Tensor, labelled: tuple[torch.Tensor, torch.Tensor] | None = None) -> Unlabelled:
        """The student's view of an unlabelled batch ``[U, C, *S]`` and the teacher's targets.

        ``labelled`` (``copy_paste`` only): the step's labelled images ``[B, C, *S]`` and labels ``[B, 1, *S]``;
        unlabelled image ``i`` is mixed with labelled image ``i mod B``.
        """
        g = self.generator
        if self.method == "copy_paste":
            if labelled is None:
                raise ValueError("copy_paste mixes each unlabelled image with a labelled one: give the labelled batch")
            return self._copy_paste(images, *labelled)
        if not self.train.strong_views:  # the mean teacher with its noise view
            sigma = self.train.semi_noise

            def noisy(x: torch.Tensor) -> torch.Tensor:
                noise = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype) * sigma
                return x + noise.clamp(-2 * sigma, 2 * sigma)

            return Unlabelled(noisy(images), soft=self.teacher.probs(noisy(images)))
        probs = self.teacher.probs(images)  # [B, K, *S] on the weak view
        strong = strong_view(images, g)  # [B, C, *S]
        if self.train.semi_cutmix > 0:
            partner, box = cutmix_boxes(images.shape, self.train.semi_cutmix, g)  # [B], [B, 1, *S]
            strong = torch.where(box, strong[partner], strong)
            probs = torch.where(box, probs[partner], probs)  # the teacher's view moves with the boxes
        if self.method == "mean_teacher":  # semi_view=strong: the teacher's probabilities as the target
            return Unlabelled(strong, soft=probs)
        confidence, pseudo = probs.max(dim=1)  # [B, *S]
        keep = (confidence >= self.train.semi_threshold).float()
        return Unlabelled(strong, pseudo=pseudo, keep=keep)

    def _copy_paste(self, images: torch.Tensor, images_l: torch.Tensor, labels_l: torch.Tensor) -> Unlabelled:
        """BCP's bidirectional copy-paste of unlabelled ``images`` ``[U, C, *S]`` and labelled ``images_l``
        ``[B, C, *S]`` with ``labels_l`` ``[B, 1, *S]``."""
        u = images.shape[0]
        pair = torch.arange(u, device=images.device) % images_l.shape[0]  # [U] the labelled partner
        own_l, own_y = images_l[pair].to(images.dtype), labels_l[pair, 0].long()  # [U, C, *S], [U, *S]
        pseudo = self.teacher.probs(images).argmax(dim=1)  # [U, *S] the teacher's labels of the unlabelled
        box = paste_boxes(images.shape, self.train.semi_paste, self.generator)  # [U, 1, *S]
        inward = (torch.arange(u, device=images.device) % 2 == 0).view(u, *([1] * (images.ndim - 1)))
        from_labelled = torch.where(inward, box, ~box)  # [U, 1, *S] the pixels that come from the labelled image
        mixed = torch.where(from_labelled, own_l, images)  # [U, C, *S]
        target = torch.where(from_labelled[:, 0], own_y, pseudo)  # [U, *S]
        weight = torch.where(from_labelled[:, 0], 1.0, self.train.semi_paste_weight).to(images.dtype)  # [U, *S]
        return Unlabelled(mixed, pseudo=target, keep=weight.float())

    def loss(
        self, logits: torch.Tensor, target: Unlabelled, per_case: bool = False
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The unlabelled loss of the student's ``logits`` ``[B, K, *S]`` on ``target``'s view (a scalar, or
        with ``per_case`` ``[B]``, each case's from its own pixels: DP-SGD), and its metrics (``semi_loss``;
        fixmatch: ``semi_confident``, the share of pixels with a pseudo-label)."""
        logits = logits.float()
        if target.soft is not None:
            squared = (torch.softmax(logits, dim=1) - target.soft) ** 2  # [B, K, *S]
            loss = squared.flatten(1).mean(1) if per_case else squared.mean()
            return loss, {"semi_loss": loss.mean().item()}
        assert target.pseudo is not None and target.keep is not None
        dice = self.method == "copy_paste" or self.train.semi_loss == "ce_dice"
        loss = masked_dice_ce(logits, target.pseudo, target.keep, per_case=per_case, dice=dice)
        if self.method == "copy_paste":
            return loss, {"semi_loss": loss.mean().item()}
        return loss, {"semi_loss": loss.mean().item(), "semi_confident": target.keep.mean().item()}

    def after_step(self, student: nn.Module) -> None:
        self.teacher.update(student)


@dataclass
class SemiTraining:
    """A fine-tuning stretch's semi-supervised side: the objective, the unlabelled batches and the run's
    progress of each step (the weight's ramp follows it, across federated rounds too)."""

    objective: SemiObjective
    loader: torch.utils.data.DataLoader
    progress_at: Callable[[int], float]
    first_pass: int = 0
    stream: Iterator[torch.Tensor] | None = None  # :meth:`batches`, once started

    @property
    def unlabelled(self) -> int:
        """The number of unlabelled cases it draws from."""
        return len(self.loader.dataset)  # type: ignore[arg-type]  # (a SegDataset)

    def batches(self) -> Iterator[torch.Tensor]:
        """Unlabelled image batches ``[B, C, *S]`` without end, each pass reshuffled and re-augmented."""
        passes = 0
        while True:
            set_epoch = getattr(getattr(self.loader, "dataset", None), "set_epoch", None)
            if set_epoch is not None:
                set_epoch(self.first_pass + passes)
            for batch in self.loader:
                yield batch["image"]
            passes += 1
