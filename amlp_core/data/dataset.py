"""In-memory samples, slicing, splits and the torch Dataset used by the training loops."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from amlp_core.config import BAD_CASE_POLICIES
from amlp_core.data.cases import DatasetIndex, Sample
from amlp_core.data.io import data_error
from amlp_core.data.partition import group_units
from amlp_core.data.transforms import AUGMENTATIONS, fit_to_roi, random_flip, strong_augment
from amlp_core.data.validate import Expect, inspect_case, refuse_or_skip
from amlp_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def load_samples(
    index: DatasetIndex,
    expect: Expect | None = None,
    on_bad_case: str = "refuse",
    with_labels: bool = True,
    progress: bool = True,
) -> list[Sample]:
    """Read and check (:func:`~amlp_core.data.validate.inspect_case`) every case of ``index``, as read: its
    own grid and intensities (:func:`~amlp_core.data.plan.prepare` brings it onto the run's plan).

    Args:
        expect: what every case must be (default: ``index``'s spatial dims, any non-negative label).
        on_bad_case: ``refuse`` (raise at the first bad entry or case) or ``skip`` (log it, leave it out).
        with_labels: read the label maps (else every sample's label is None).

    Returns:
        Samples with image float32 ``[C, *spatial]`` and label int64 ``[*spatial]`` (None
        when the case has no label or ``with_labels`` is False).

    Raises:
        DataError: a bad entry or case under ``refuse`` (the message names the file), or no usable case.
    """
    if on_bad_case not in BAD_CASE_POLICIES:
        raise ConfigError(f"invalid data.on_bad_case={on_bad_case!r}: must be one of {', '.join(BAD_CASE_POLICIES)}")
    expect = expect or Expect(index.spatial_dims)
    where = str(index.root)
    refuse_or_skip(list(index.problems), on_bad_case, where)  # before any file is read
    samples = []
    for case in tqdm(index.cases, desc="Loading", unit="case", disable=None if progress else True):
        sample, problems = inspect_case(case, expect, with_labels)
        if sample is None:
            refuse_or_skip(problems, on_bad_case, where)
            continue
        samples.append(sample)
    if not samples:
        raise data_error(index.root, f"none of its {len(index.cases)} cases is usable")
    return samples


def _slice_affine(affine: np.ndarray, axis: int, k: int) -> np.ndarray:
    """Affine of slice ``k`` along ``axis``: in-plane axes first, the sliced axis third."""
    kept = [a for a in range(3) if a != axis]
    out = np.eye(4)
    out[:3, :3] = affine[:3, [*kept, axis]]
    out[:3, 3] = affine[:3, 3] + affine[:3, axis] * k
    return out


def to_slices(samples: Sequence[Sample], axis: int = -1, min_foreground: float | None = None) -> list[Sample]:
    """Cut 3D samples into 2D slices along spatial ``axis`` (names ``name#z012``).

    Image ``[C, X, Y, Z]`` -> slices ``[C, X, Y]`` (for axis -1). 2D samples pass unchanged.
    With ``min_foreground``, labelled slices whose fraction of nonzero label pixels is below
    it are dropped; unlabelled slices are always kept.
    """
    slices = []
    for sample in samples:
        if sample.image.ndim != 4:
            slices.append(sample)
            continue
        ax = axis % 3
        for k in range(sample.image.shape[ax + 1]):
            label = np.take(sample.label, k, axis=ax) if sample.label is not None else None
            if min_foreground is not None and label is not None and (label > 0).mean() < min_foreground:
                continue
            image = np.take(sample.image, k, axis=ax + 1)
            affine = _slice_affine(sample.affine, ax, k)
            name = f"{sample.name}#z{k:03d}"  # its group: the volume's (one patient, one record under DP)
            slices.append(Sample(name, image, label, affine, group=sample.group_key, category=sample.category))
    return slices


class SegDataset(torch.utils.data.Dataset):
    """Samples padded/cropped to ``roi_size``, optionally augmented.

    Items are dicts: ``"image"`` float32 ``[C, *roi_size]``, ``"label"`` int64
    ``[1, *roi_size]`` (only when the samples are labelled) and ``"index"`` (int).
    With ``augment``: a random crop (of an image larger than ``roi_size``, around a foreground voxel
    with probability ``foreground_share``), then :func:`strong_augment` when ``strength`` is
    ``"strong"`` (``"flip"`` skips it), then random flips; every draw comes from a generator
    seeded by ``(seed, epoch, index)``. Without ``augment``: a center crop only.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        roi_size: Sequence[int],
        augment: bool = False,
        seed: int = 0,
        strength: str = "strong",
        foreground_share: float = 0.0,
    ):
        if not samples:
            raise DataError("SegDataset: no samples given")
        unlabelled = [s.name for s in samples if s.label is None]
        if unlabelled and len(unlabelled) != len(samples):
            raise data_error(unlabelled[0], "sample has no label while other samples in the dataset do")
        spatial_dims = samples[0].image.ndim - 1
        if len(roi_size) != spatial_dims or any(int(r) < 1 for r in roi_size):
            raise ConfigError(f"roi_size {tuple(roi_size)} must be {spatial_dims} positive sizes")
        if strength not in AUGMENTATIONS:
            raise ConfigError(f"augmentation strength {strength!r} must be one of {', '.join(AUGMENTATIONS)}")
        self.samples = list(samples)
        self.roi_size = tuple(int(r) for r in roi_size)
        self.augment = augment
        self.strength = strength
        self.seed = seed
        self.foreground_share = foreground_share
        self.epoch = 0
        self.view = 0
        self.has_labels = not unlabelled

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation stream for this epoch."""
        self.epoch = epoch

    def set_view(self, view: int) -> None:
        """Choose another augmentation of each item in this epoch (DP-SGD's augmentation multiplicity:
        :class:`~amlp_core.privacy.dp.ViewsPerRecord`); view 0 is the epoch's own."""
        self.view = view

    def record_keys(self) -> list[str]:
        """Each item's record (:attr:`~amlp_core.data.cases.Sample.group_key`): the patient, for DP-SGD."""
        return [s.group_key for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        key = (self.seed, self.epoch, i) if not self.view else (self.seed, self.epoch, i, self.view)
        rng = np.random.default_rng(key) if self.augment else None
        image, label = fit_to_roi(sample.image, sample.label, self.roi_size, rng, self.foreground_share)
        if rng is not None:
            if self.strength == "strong":
                image, label = strong_augment(image, label, rng)
            image, label = random_flip(image, label, rng)
        item = {"image": torch.from_numpy(image.astype(np.float32, copy=False)), "index": i}
        if label is not None:
            item["label"] = torch.from_numpy(label[None].astype(np.int64, copy=False))
        return item


class RecordDataset(torch.utils.data.Dataset):
    """A labelled and an unlabelled :class:`SegDataset` as one set of records: semi-supervised fine-tuning
    under DP-SGD, whose Poisson sampling, clipping and accountant must cover every case it learns from.

    Items are the labelled dataset's (``"labelled"`` 1), then the unlabelled one's with an all-zero
    ``"label"`` (``"labelled"`` 0, the label never read); ``"index"`` runs over both.
    """

    def __init__(self, labelled: SegDataset, unlabelled: SegDataset):
        if not labelled.has_labels or unlabelled.has_labels:
            raise ValueError("RecordDataset takes a labelled dataset, then an unlabelled one")
        self.labelled, self.unlabelled = labelled, unlabelled

    def set_epoch(self, epoch: int) -> None:
        self.labelled.set_epoch(epoch)
        self.unlabelled.set_epoch(epoch)

    def set_view(self, view: int) -> None:
        self.labelled.set_view(view)
        self.unlabelled.set_view(view)

    def record_keys(self) -> list[str]:
        return self.labelled.record_keys() + self.unlabelled.record_keys()

    def __len__(self) -> int:
        return len(self.labelled) + len(self.unlabelled)

    def __getitem__(self, i: int) -> dict:
        if i < len(self.labelled):
            return {**self.labelled[i], "labelled": 1}
        item = self.unlabelled[i - len(self.labelled)]
        label = torch.zeros((1, *item["image"].shape[1:]), dtype=torch.int64)
        return {**item, "label": label, "index": i, "labelled": 0}


class PatientRecords(torch.utils.data.Dataset):
    """One item per record (patient) of a dataset whose items share records (the 2D slices of one volume,
    near-duplicate images): a draw returns one of the record's items, chosen by ``(seed, epoch, record)``.
    DP-SGD samples, clips and counts these, so that one patient is one record however many slices it has.
    """

    def __init__(self, dataset: SegDataset | RecordDataset, seed: int = 0):
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(dataset.record_keys()):
            groups.setdefault(key, []).append(i)
        self.dataset, self.members, self.seed, self.epoch, self.view = dataset, list(groups.values()), seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def set_view(self, view: int) -> None:
        self.view = view
        self.dataset.set_view(view)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> dict:
        members = self.members[i]
        key = (self.seed, self.epoch, i) if not self.view else (self.seed, self.epoch, i, self.view)
        pick = members[int(np.random.default_rng(key).integers(len(members)))]
        return self.dataset[pick]


def as_records(dataset: SegDataset | RecordDataset, seed: int = 0) -> torch.utils.data.Dataset:
    """``dataset`` as DP-SGD's records: itself when every item is its own record, else
    :class:`PatientRecords`."""
    keys = dataset.record_keys()
    return dataset if len(set(keys)) == len(keys) else PatientRecords(dataset, seed)


def record_count(samples: Sequence[Sample]) -> int:
    """The number of records (patients: :attr:`~amlp_core.data.cases.Sample.group_key`) among ``samples``."""
    return len({s.group_key for s in samples})


def _take(units: list[list[str]], order: np.ndarray, quota: dict[str, int], stratum: Callable[[str], str]):
    """Units in ``order`` whose cases fit in their stratum's ``quota`` (a group that would overshoot is
    passed over). With singleton units and one stratum: exactly the first ``quota`` units in order."""
    taken, chosen = Counter[str](), []
    for j in order:
        unit, s = units[j], stratum(units[j][0])
        if taken[s] + len(unit) <= quota.get(s, 0):
            chosen.append(unit)
            taken[s] += len(unit)
    return chosen


def split_names(
    names: Sequence[str],
    test_fraction: float,
    seed: int,
    groups: Mapping[str, str] | None = None,
    strata: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Deterministic train/test split of unique ``names`` (independent of their order).

    Args:
        groups: ``{name: group key}`` of near-duplicates (:mod:`~amlp_core.data.duplicates`): a group goes
            wholly to one side. Names without a group are groups of their own.
        strata: ``{name: category}`` (BUSI's benign / malignant / normal): each category gives its own
            share to the test part. None: one stratum.

    Returns:
        ``(train, test)``, each sorted; ``test`` has about ``round(test_fraction * n)`` names (exactly,
        without groups and strata), at least one when ``test_fraction > 0``, and ``train`` keeps at least one.
    """
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    ordered = sorted(set(names))
    if len(ordered) != len(names):
        duplicate = next(n for n, count in Counter(names).items() if count > 1)
        raise DataError(f"split_names: case name {duplicate!r} occurs more than once")
    n_test = round(test_fraction * len(ordered))
    if test_fraction > 0 and len(ordered) > 1:
        n_test = min(max(n_test, 1), len(ordered) - 1)
    units = group_units(ordered, groups)
    perm = np.random.default_rng(seed).permutation(len(units))
    if strata:
        sizes = Counter(strata.get(n, "") for n in ordered)
        quota = {s: round(test_fraction * count) for s, count in sizes.items()}
        chosen = _take(units, perm, quota, lambda n: strata.get(n, ""))
    else:
        chosen = _take(units, perm, {"": n_test}, lambda n: "")
    if test_fraction > 0 and not chosen and len(units) > 1:  # every group too large for the quota
        chosen = [units[perm[0]]]
    test = {n for unit in chosen for n in unit}
    if len(test) == len(ordered):  # (one stratum's quota took every case)
        test -= set(units[perm[-1]])
    return [n for n in ordered if n not in test], [n for n in ordered if n in test]


def label_subset(samples: Sequence[Sample], fraction: float, seed: int) -> list[Sample]:
    """Deterministic subset of the labelled samples: about ``max(1, round(fraction * n))`` of them (exactly,
    when no two are near-duplicates), near-duplicates (:attr:`~amlp_core.data.cases.Sample.group_key`)
    all in or all out, so that the unlabelled pool holds no copy of a labelled case.

    Raises:
        ConfigError: ``fraction`` not in (0, 1].
        DataError: no sample has a label.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}")
    labelled = sorted((s for s in samples if s.label is not None), key=lambda s: s.name)
    if not labelled:
        raise DataError(f"label_subset: none of the {len(samples)} samples has a label")
    k = max(1, round(fraction * len(labelled)))
    by_name = {s.name: s for s in labelled}
    units = group_units(list(by_name), {s.name: s.group_key for s in labelled})
    perm = np.random.default_rng(seed).permutation(len(units))
    chosen = _take(units, perm, {"": k}, lambda n: "") or [units[perm[0]]]
    picked = {n for unit in chosen for n in unit}
    return [s for s in labelled if s.name in picked]
