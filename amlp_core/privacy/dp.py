"""Record-level DP-SGD with Opacus around the project's own models and loops.

:class:`PrivateTraining` turns a model, its optimizer and its training cases into their
private counterparts for one stretch of training (a federated round, or a whole local run):

- per-case gradients by Opacus' hooks, attached to the model itself (no wrapper, so state
  dict keys do not change and the same encoder still loads strictly into the other head);
- Poisson sampling of the cases (each case joins each batch with probability ``q``), the
  sampling the RDP analysis assumes; an empty batch is still a step, of noise only;
- Opacus' DP optimizer: clip each case's gradient to ``max_grad_norm``, add Gaussian noise;
- an RDP accountant that counts the steps actually taken, for the caller's ledger;
- augmentation multiplicity (De et al. 2022, ``privacy.augmult``): each sampled record comes as ``k``
  augmented views, whose gradients are averaged into the record's one gradient before it is clipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from amlp_core.errors import ConfigError
from amlp_core.privacy.ledger import Stretch

if TYPE_CHECKING:
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.optimizers import DPOptimizer

    from amlp_core.config import PrivacyConfig
    from amlp_core.privacy.ledger import PrivacyLedger

# Opacus is imported where DP-SGD runs, not at module level: it costs about 2 s at every start
# (torch.distributed), and most runs are not private.

log = logging.getLogger(__name__)


def dataset_size(dataset: Any) -> int:
    """The number of cases of a map-style dataset (torch's ``Dataset`` type has no ``__len__``; ours all do)."""
    return len(dataset)


def check_private(model: nn.Module, what: str = "model") -> None:
    """Refuse a model Opacus cannot train privately (e.g. BatchNorm mixes cases in a batch).

    Raises:
        ConfigError: listing what Opacus' validator found.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        found = "; ".join(str(e) for e in errors[:5])
        raise ConfigError(f"the {what} cannot be trained with DP-SGD: {found}")


def sample_rate(num_cases: int, batch_size: int) -> float:
    """Poisson sampling rate giving ``batch_size`` cases per batch on average."""
    if num_cases < 1:
        raise ValueError("private training needs at least one case")
    return min(1.0, batch_size / num_cases)


def steps_per_epoch(rate: float) -> int:
    """Batches in one pass of Poisson sampling at ``rate`` (as Opacus' sampler counts them)."""
    return max(int(1 / rate), 1)


def _collate_or_none(items: list) -> dict | None:
    return default_collate(items) if items else None  # None: an empty Poisson batch


def _collate_views(items: list) -> dict | None:
    """Records of :class:`ViewsPerRecord` (each value ``[k, ...]``) as one batch of their views in a row:
    ``[B * k, ...]``, record ``b``'s views at ``b * k`` to ``b * k + k - 1``."""
    batch = _collate_or_none(items)
    return None if batch is None else {key: value.flatten(0, 1) for key, value in batch.items()}


class ViewsPerRecord(Dataset):
    """Augmentation multiplicity (De et al. 2022): every draw of record ``i`` yields ``k`` augmentations of it
    (the wrapped dataset's ``set_view``), each value stacked ``[k, ...]``. DP-SGD averages the ``k`` views'
    gradients into the record's one gradient before clipping, so a record is still one record."""

    def __init__(self, dataset: Any, k: int):
        if k < 2 or not hasattr(dataset, "set_view"):
            raise ValueError(f"{type(dataset).__name__} cannot give {k} views of a record")
        self.dataset, self.k = dataset, k

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return dataset_size(self.dataset)

    def __getitem__(self, i: int) -> dict:
        views = []
        for v in range(self.k):
            self.dataset.set_view(v)
            views.append(self.dataset[i])
        self.dataset.set_view(0)
        return {key: torch.stack([torch.as_tensor(view[key]) for view in views]) for key in views[0]}


def poisson_loader(dataset: Dataset, batch_size: int, generator: torch.Generator, views: int = 1) -> DataLoader:
    """Batches where every case takes part independently with probability ``batch_size / N``.

    Yields the dataset's collated items, or ``None`` for an empty batch; with ``views`` > 1, each case's
    ``views`` augmentations in a row (:class:`ViewsPerRecord`).
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    rate = sample_rate(dataset_size(dataset), batch_size)
    sampler = UniformWithReplacementSampler(num_samples=dataset_size(dataset), sample_rate=rate, generator=generator)
    if views > 1:
        return DataLoader(ViewsPerRecord(dataset, views), batch_sampler=sampler, collate_fn=_collate_views)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate_or_none)


def _view_averaging(optimizer_class: type, views: int) -> type:
    """``optimizer_class`` (Opacus' DPOptimizer) that first averages each run of ``views`` per-sample
    gradients (one record's views, :func:`_collate_views`) into one, then clips and noises per record."""

    class ViewAveragingDPOptimizer(optimizer_class):  # type: ignore[valid-type,misc]
        def pre_step(self, closure=None):
            for p in self.params:
                grad_sample = getattr(p, "grad_sample", None)
                if isinstance(grad_sample, torch.Tensor) and grad_sample.shape[0] > 0:
                    p.grad_sample = grad_sample.view(-1, views, *grad_sample.shape[1:]).mean(1)  # [B, *p]
            return super().pre_step(closure)

    return ViewAveragingDPOptimizer


def noise_only_step(optimizer: DPOptimizer) -> None:
    """The DP step of an empty batch: no case's gradient, the noise only (and one step counted).

    The previous step's clipped sum is cleared first: it must not be added again (Opacus refuses it)."""
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class PrivateTraining:
    """Context manager: private optimizer and loader for one stretch of training.

    Args:
        model: trained in place (Opacus hooks are attached on entry, removed on exit).
        optimizer: the model's optimizer; wrapped, not replaced (its state stays usable).
        dataset: the training cases (any map-style dataset).
        batch_size: expected cases per batch.
        noise_multiplier: Gaussian noise std / ``max_grad_norm``.
        max_grad_norm: per-case gradient clipping bound (L2 over all parameters).
        seed: seeds the sampling and the noise (seeded runs repeat; Opacus' secure mode is not used).
        views: augmentations of each sampled case, their gradients averaged before clipping (1: none).

    Usage::

        with PrivateTraining(model, opt, dataset, 8, sigma, 1.0, seed) as dp:
            for batch in dp.loader: ... dp.optimizer.step() ...
        ledger.record(phase, round, dp.stretches)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Dataset,
        batch_size: int,
        noise_multiplier: float,
        max_grad_norm: float,
        seed: int,
        views: int = 1,
    ) -> None:
        from opacus.accountants import RDPAccountant

        check_private(model)
        self.model, self.base_optimizer, self.dataset = model, optimizer, dataset
        self.rate = sample_rate(dataset_size(dataset), batch_size)
        self.noise_multiplier, self.max_grad_norm, self.seed = noise_multiplier, max_grad_norm, seed
        self.views = views
        self.accountant = RDPAccountant()
        self.hooks: GradSampleHooks | None = None
        self.optimizer: DPOptimizer | None = None
        self.loader: DataLoader | None = None

    def __enter__(self) -> PrivateTraining:
        from opacus.grad_sample.grad_sample_module import GradSampleHooks
        from opacus.optimizers import DPOptimizer

        device = next(self.model.parameters()).device
        self.hooks = GradSampleHooks(self.model, batch_first=True, loss_reduction="mean", strict=False)
        noise = torch.Generator(device=device).manual_seed(self.seed)
        optimizer_class = DPOptimizer if self.views == 1 else _view_averaging(DPOptimizer, self.views)
        self.optimizer = optimizer_class(
            self.base_optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=max(1, round(self.rate * dataset_size(self.dataset))),
            loss_reduction="mean",
            generator=noise,
        )
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.rate))
        self.loader = poisson_loader(
            self.dataset,
            round(self.rate * dataset_size(self.dataset)),
            torch.Generator().manual_seed(self.seed + 1),
            self.views,
        )
        return self

    def __exit__(self, *exc) -> None:
        if self.hooks is not None:
            self.hooks.cleanup()
            self.hooks = None
        for p in self.model.parameters():  # no per-case gradients left behind
            p.grad_sample = None  # type: ignore[attr-defined]  # set by Opacus' hooks
            p.grad = None

    @property
    def stretches(self) -> list[Stretch]:
        """What the accountant counted: ``(noise_multiplier, sample_rate, steps)`` stretches."""
        return [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.rate)


@contextmanager
def charged_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    ledger: PrivacyLedger | None,
    batch_size: int,
    privacy: PrivacyConfig,
    seed: int,
    phase: str,
    round_: int,
) -> Iterator[tuple[Any, Any, dict[str, float]]]:
    """``(optimizer, batches, spent)`` for one stretch of training, private or not.

    With a ledger (already planned and checked: :meth:`PrivacyLedger.planned`): DP-SGD at the
    ledger's noise (:class:`PrivateTraining`) over ``loader``'s cases as records (patients: the slices of
    one volume are one record), clipped at ``privacy.max_grad_norm``, each sampled case in
    ``privacy.augmult`` augmentations; after the block the steps the accountant counted are recorded on
    the ledger as ``phase`` round ``round_``, and ``spent`` then holds ``epsilon``, the cumulative epsilon.
    Without one: the plain optimizer and loader, and ``spent`` stays empty.
    """
    if ledger is None:
        yield optimizer, loader, {}
        return
    spent: dict[str, float] = {}
    if ledger.noise_multiplier is None:
        raise ValueError(f"privacy ledger {ledger.path}: its noise is not fixed yet (PrivacyLedger.planned fixes it)")
    from amlp_core.data.dataset import as_records  # (the data layer; here only where DP runs)

    records = as_records(loader.dataset, seed)  # type: ignore[arg-type]  # (a SegDataset or RecordDataset)
    with PrivateTraining(
        model, optimizer, records, batch_size, ledger.noise_multiplier, privacy.max_grad_norm, seed, privacy.augmult
    ) as dp:
        yield dp.optimizer, dp.loader, spent
    spent["epsilon"] = ledger.record(phase, round_, dp.stretches)
