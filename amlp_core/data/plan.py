"""The run's plan: one geometry and one intensity scale for every case of every site.

Each site sums its data up in a :class:`Fingerprint` (aggregate numbers only: counts, the median and range
of spacing and size, foreground intensity percentiles, the modality); :func:`decide_plan` turns the sites'
fingerprints into the run's plan (a decided :class:`~amlp_core.config.PlanConfig`), :func:`fit_problem`
says why a site does not fit it, and :func:`prepare` brings one case onto the plan (reoriented to RAS,
resampled to the target spacing, normalised) the same way at every site and in ``fedamlp predict``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from amlp_core.config import Config, PlanConfig, build_config
from amlp_core.data.cases import Sample
from amlp_core.data.geometry import (
    ANISOTROPY,
    SPLINE_ORDER,
    canonical_grid,
    low_resolution_axis,
    planned_grid,
    spacing_of,
    to_grid,
)
from amlp_core.data.transforms import normalize_intensity
from amlp_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"
#: Names a dataset may give its modality, and the one the plan uses (DICOM's codes).
_MODALITY_NAMES = {"MRI": "MR", "MR": "MR", "T1": "MR", "T2": "MR", "FLAIR": "MR", "CT": "CT", "PT": "PT", "PET": "PT"}
#: Foreground voxels each labelled case gives to the intensity statistics (nnU-Net samples 10,000 too).
VOXELS_PER_CASE = 10_000
PERCENTILES = (0.5, 50.0, 99.5)


class PlanError(DataError):
    """A site's data do not fit the run's plan, or no plan can be made of the sites' fingerprints."""


class PlanMisfit(PlanError):
    """Data whose fingerprint does not fit the run's plan (:func:`fit_problem`); ``problem`` says why."""

    def __init__(self, message: str, problem: Misfit):
        super().__init__(message)
        self.problem = problem


def modality_name(text: str) -> str:
    """The plan's name of a modality: ``"MRI"`` -> ``"MR"``, ``"ct"`` -> ``"CT"``, ``""`` -> ``"unknown"``."""
    text = str(text).strip().upper()
    return UNKNOWN if text in ("", "AUTO", "UNKNOWN") else _MODALITY_NAMES.get(text, text)


@dataclass(frozen=True)
class Fingerprint:
    """What one site tells the server about its data: aggregates over its cases, never a case's own list.

    Spacings are in mm and sizes in voxels, per axis in RAS order (after reorientation); the intensity
    numbers are over foreground voxels of the labelled cases, per channel (empty when none is labelled).
    """

    cases: int
    labelled: int
    modality: str
    spacing_median: tuple[float, ...]
    spacing_min: tuple[float, ...]
    spacing_max: tuple[float, ...]
    size_median: tuple[float, ...]
    size_min: tuple[float, ...]
    size_max: tuple[float, ...]
    spacing_p10: tuple[float, ...] = ()  # per axis, the 10th percentile of the cases' spacings
    foreground_voxels: int = 0  # voxels behind the intensity numbers
    intensity_p005: tuple[float, ...] = ()
    intensity_p50: tuple[float, ...] = ()
    intensity_p995: tuple[float, ...] = ()
    intensity_mean: tuple[float, ...] = ()
    intensity_std: tuple[float, ...] = ()

    def to_record(self) -> dict[str, Any]:
        """Flat ``{key: int | float | str | list}``: what a Flower ConfigRecord carries."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], who: str) -> Fingerprint:
        """A fingerprint read from a site's reply, every value checked (``who`` names the site in errors).

        Raises:
            PlanError: a missing, extra or malformed value.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        extra = sorted(set(record) - set(fields))
        if extra:
            raise PlanError(f"{who}: fingerprint has unknown values {extra}")
        values: dict[str, Any] = {}
        for name in fields:
            if name not in record:
                if fields[name].default is dataclasses.MISSING:
                    raise PlanError(f"{who}: fingerprint lacks {name!r}")
                continue
            values[name] = _checked(name, record[name], who)
        fp = cls(**values)
        dims = len(fp.spacing_median)
        geometry = (fp.spacing_median, fp.spacing_min, fp.spacing_max, fp.size_median, fp.size_min, fp.size_max)
        if dims not in (2, 3) or any(len(v) != dims for v in geometry):
            raise PlanError(f"{who}: fingerprint spacings and sizes must all have 2 or 3 values")
        if any(s <= 0 for v in (*geometry, fp.spacing_p10) for s in v):
            raise PlanError(f"{who}: fingerprint spacings and sizes must be positive")
        if len(fp.spacing_p10) not in (0, dims):
            raise PlanError(f"{who}: fingerprint spacing_p10 must have {dims} values")
        if fp.labelled > fp.cases or fp.cases < 1:
            raise PlanError(f"{who}: fingerprint counts {fp.cases} cases, {fp.labelled} labelled")
        lengths = {len(v) for v in (fp.intensity_p005, fp.intensity_p50, fp.intensity_p995, fp.intensity_mean)}
        if len(lengths | {len(fp.intensity_std)}) != 1 or any(s < 0 for s in fp.intensity_std):
            raise PlanError(f"{who}: fingerprint intensity values are malformed")
        return fp


def _checked(name: str, value: Any, who: str) -> Any:
    """One fingerprint value of the right type: finite numbers, counts >= 0, a short modality name."""
    if name == "modality":
        if not isinstance(value, str) or len(value) > 16:
            raise PlanError(f"{who}: fingerprint modality {value!r} is not a modality name")
        return modality_name(value)
    if name in ("cases", "labelled", "foreground_voxels"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PlanError(f"{who}: fingerprint {name}={value!r} is not a count")
        return value
    if not isinstance(value, (list, tuple)) or len(value) > 8:
        raise PlanError(f"{who}: fingerprint {name} is not a short list of numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise PlanError(f"{who}: fingerprint {name} holds a value that is not a finite number")
    return tuple(float(v) for v in value)


def fingerprint(samples: Sequence[Sample], modality: str, seed: int = 0) -> Fingerprint:
    """Sum up a site's cases (as read: their own grid and intensities).

    Args:
        samples: images ``[C, *spatial]``, labels ``[*spatial]`` or None, affines ``(4, 4)``.
        modality: the site's modality (:func:`modality_name` is applied).
        seed: the draw of :data:`VOXELS_PER_CASE` foreground voxels per labelled case.
    """
    if not samples:
        raise DataError("fingerprint: no cases")
    dims = samples[0].image.ndim - 1
    spacings, sizes = [], []
    for s in samples:
        shape = s.image.shape[1:]
        if dims == 3:
            shape, affine = canonical_grid(shape, s.affine)
            spacings.append(spacing_of(affine))
        else:
            spacings.append(spacing_of(s.affine)[:dims])
        sizes.append(np.asarray(shape, dtype=np.float64))
    rng = np.random.default_rng(seed)
    voxels = [_foreground_voxels(s, rng) for s in samples if s.label is not None]
    values = np.concatenate(voxels, axis=1) if voxels else np.zeros((samples[0].image.shape[0], 0))
    has = values.shape[1] > 0

    def stat(fn) -> tuple[float, ...]:
        return tuple(float(v) for v in fn(values)) if has else ()

    def agg(rows: list[np.ndarray], fn) -> tuple[float, ...]:
        return tuple(float(v) for v in fn(np.stack(rows), axis=0))

    return Fingerprint(
        cases=len(samples),
        labelled=sum(s.label is not None for s in samples),
        modality=modality_name(modality),
        spacing_median=agg(spacings, np.median),
        spacing_min=agg(spacings, np.min),
        spacing_max=agg(spacings, np.max),
        spacing_p10=agg(spacings, lambda a, axis: np.percentile(a, 10, axis=axis)),
        size_median=agg(sizes, np.median),
        size_min=agg(sizes, np.min),
        size_max=agg(sizes, np.max),
        foreground_voxels=int(values.shape[1]),
        intensity_p005=stat(lambda v: np.percentile(v, PERCENTILES[0], axis=1)),
        intensity_p50=stat(lambda v: np.percentile(v, PERCENTILES[1], axis=1)),
        intensity_p995=stat(lambda v: np.percentile(v, PERCENTILES[2], axis=1)),
        intensity_mean=stat(lambda v: v.mean(axis=1)),
        intensity_std=stat(lambda v: v.std(axis=1)),
    )


def _foreground_voxels(sample: Sample, rng: np.random.Generator) -> np.ndarray:
    """Up to :data:`VOXELS_PER_CASE` foreground voxels of a labelled sample: ``[C, n]``."""
    assert sample.label is not None
    values = sample.image[:, sample.label > 0]  # [C, n_foreground]
    if values.shape[1] > VOXELS_PER_CASE:
        values = values[:, rng.choice(values.shape[1], VOXELS_PER_CASE, replace=False)]
    return values


def _weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    return float(np.asarray(values)[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def deciding(fingerprints: Mapping[str, Fingerprint], modality: str = "") -> tuple[str, list[Fingerprint]]:
    """The run's modality (``modality`` where set, else the known one of most cases) and the fingerprints
    that decide the plan: those of that modality or of an unknown one (all, where none is).

    Raises:
        PlanError: no fingerprint.
    """
    if not fingerprints:
        raise PlanError("no site sent a fingerprint: there is nothing to plan from")
    votes: Counter[str] = Counter()
    for fp in fingerprints.values():
        votes[fp.modality] += fp.cases
    chosen = modality and modality_name(modality)
    if not chosen:
        known = [m for m, _ in votes.most_common() if m != UNKNOWN]
        chosen = known[0] if known else UNKNOWN
    kept = [fp for fp in fingerprints.values() if fp.modality in (chosen, UNKNOWN)] or list(fingerprints.values())
    return chosen, kept


def planned_dims(fingerprints: Mapping[str, Fingerprint], modality: str = "") -> int:
    """The dimensions (2 or 3) of most cases among the fingerprints that decide the plan (:func:`deciding`)."""
    votes: Counter[int] = Counter()
    for fp in deciding(fingerprints, modality)[1]:
        votes[len(fp.spacing_median)] += fp.cases
    return votes.most_common(1)[0][0]


def decide_plan(
    fingerprints: Mapping[str, Fingerprint], base: PlanConfig, budget: Sequence[int], step: int
) -> PlanConfig:
    """The run's plan from the sites' fingerprints; the values ``base`` sets are kept.

    - modality: that of most cases (a site of another modality is then refused by :func:`fit_problem`);
    - target spacing: per axis, the median of the sites' median spacings weighted by their cases;
    - normalisation: ``ct`` for CT (clip to the sites' 0.5 to 99.5 foreground percentiles, then z-score
      with the pooled foreground mean and std of channel 0), else per-case ``zscore``;
    - input size: :func:`decide_input_size` of the sites' median shape on the target spacing, within
      ``budget`` (``model.img_size``), every side a multiple of ``step`` (``Config.input_step``).

    Raises:
        PlanError: no fingerprint, or CT without any labelled case to take the intensities from.
    """
    modality, kept = deciding(fingerprints, base.modality)
    spacing = base.target_spacing
    if not spacing:
        dims = len(kept[0].spacing_median)
        same = [fp for fp in kept if len(fp.spacing_median) == dims]
        spacing = tuple(
            round(_weighted_median([fp.spacing_median[a] for fp in same], [fp.cases for fp in same]), 4)
            for a in range(dims)
        )
        spacing = _thick_slice_spacing(spacing, same)
    normalization = base.normalization or ("ct" if modality == "CT" else "zscore")
    input_size = base.input_size or decide_input_size(_median_shape(kept, spacing), spacing, budget, step)
    # 2D images are resized to the input size: measured on BUSI, it segments better than crops and sliding
    # windows at a fraction of the cost (docs/results.md); 3D scans are resampled to the spacing instead
    # ("": their plans stay as they were before image_fit existed).
    image_fit = base.image_fit or ("resize" if len(spacing) == 2 else "")
    decided: dict[str, Any] = {
        "target_spacing": spacing,
        "modality": modality,
        "normalization": normalization,
        "input_size": tuple(input_size),
        "image_fit": image_fit,
    }
    if normalization == "ct" and not (base.clip and base.std > 0):
        decided.update(_ct_intensities(kept, base))
    plan = dataclasses.replace(base, **decided)
    logger.info("plan: %s", describe(plan))
    return plan


def _thick_slice_spacing(spacing: tuple[float, ...], fps: Sequence[Fingerprint]) -> tuple[float, ...]:
    """nnU-Net's rule for thick slices: where the median spacing's coarsest axis is more than
    :data:`~amlp_core.data.geometry.ANISOTROPY` times the others' and the median case has more than that
    many times fewer voxels along it, the target along that axis is the 10th percentile of its spacings
    (here the case-weighted median of the sites' 10th percentiles), no finer than the other axes: the
    finer scans are not thinned to the typical one, and the thick ones are not made to look finer in plane.
    """
    if len(spacing) != 3:
        return spacing
    worst = int(np.argmax(spacing))
    others = [a for a in range(3) if a != worst]
    weights = [fp.cases for fp in fps]
    size = [_weighted_median([fp.size_median[a] for fp in fps], weights) for a in range(3)]
    thick = spacing[worst] > ANISOTROPY * max(spacing[a] for a in others)
    few = size[worst] * ANISOTROPY < min(size[a] for a in others)
    if not (thick and few):
        return spacing
    p10 = [fp.spacing_p10[worst] if fp.spacing_p10 else fp.spacing_min[worst] for fp in fps]
    target = max(_weighted_median(p10, weights), max(spacing[a] for a in others))
    logger.info("plan: thick slices along axis %d: target %.4g mm there (median %.4g)", worst, target, spacing[worst])
    return tuple(round(target, 4) if a == worst else s for a, s in enumerate(spacing))


def _median_shape(fps: Sequence[Fingerprint], spacing: Sequence[float]) -> tuple[float, ...] | None:
    """The sites' median case shape on the target ``spacing`` (the median of their medians, weighted by
    cases); None when the fingerprints are of other dimensions (2D slices of 3D scans, data.as_slices)."""
    same = [fp for fp in fps if len(fp.size_median) == len(spacing)]
    if not same:
        return None
    if len(spacing) == 3:  # the plan resamples 3D cases; 2D images keep their pixels
        shapes = [[n * own / t for n, own, t in zip(fp.size_median, fp.spacing_median, spacing)] for fp in same]
    else:
        shapes = [list(fp.size_median) for fp in same]
    weights = [fp.cases for fp in same]
    return tuple(_weighted_median([s[a] for s in shapes], weights) for a in range(len(spacing)))


def decide_input_size(
    median: Sequence[float] | None, spacing: Sequence[float], budget: Sequence[int], step: int
) -> tuple[int, ...]:
    """The network's input in voxels per axis.

    ``budget`` (``model.img_size``) when the median case fits in it (the whole case in one window, as
    nnU-Net's patch covers the median shape); else the median shape rounded up to multiples of ``step``,
    and while that holds more voxels than ``budget`` does (the memory the config allows), the side
    that is longest in mm loses one step: the box stays as near a cube in mm as the budget lets it.

    Args:
        median: the median case shape on the plan's spacing (None: other dimensions than the
            model's; the budget is kept).
        spacing: the plan's target spacing in mm (only the ratios matter).
        budget: the configured input size, also the voxel budget.
        step: every side is a multiple of it.
    """
    if median is None or len(median) != len(budget):
        return tuple(budget)
    need = [max(step, math.ceil(m / step - 1e-6) * step) for m in median]
    if all(n <= b for n, b in zip(need, budget)):
        return tuple(budget)
    limit = math.prod(budget)
    mm = list(spacing) if len(spacing) == len(need) else [1.0] * len(need)
    while math.prod(need) > limit:
        shrinkable = [a for a in range(len(need)) if need[a] > step]
        if not shrinkable:
            break
        # The longest side in mm; of equal ones, that which covers most of the median case.
        axis = max(shrinkable, key=lambda a: (round(need[a] * mm[a], 6), need[a] / median[a]))
        need[axis] -= step
    return tuple(need)


def planned_config(cfg: Config, plan: PlanConfig) -> Config:
    """``cfg`` on ``plan``: the plan in its ``plan`` section and the plan's input size as ``model.img_size``
    (the config a run builds its networks from and saves with its models).

    Raises:
        ConfigError: an input size the network cannot take (other dimensions, not a multiple of the patch).
    """
    if plan.input_size and len(plan.input_size) != cfg.model.spatial_dims:
        raise ConfigError(
            f"invalid plan.input_size={plan.input_size}: must have model.spatial_dims={cfg.model.spatial_dims} sizes"
        )
    model = {"img_size": plan.input_size} if plan.input_size else {}
    return cfg.replace(plan=dataclasses.asdict(plan), model=model)


def _ct_intensities(fps: Sequence[Fingerprint], base: PlanConfig) -> dict[str, Any]:
    """Clip range, mean and std of channel 0 over the sites' foreground voxels: the mean and std pooled
    exactly, the clip range from the lowest 0.5 to the highest 99.5 percentile of the sites."""
    with_fg = [fp for fp in fps if fp.foreground_voxels > 0 and fp.intensity_mean]
    if not with_fg:
        raise PlanError(
            "plan.normalization=ct needs foreground intensities, and no site has labelled cases: "
            "set plan.clip, plan.mean and plan.std"
        )
    n = np.array([fp.foreground_voxels for fp in with_fg], dtype=np.float64)
    means = np.array([fp.intensity_mean[0] for fp in with_fg])
    stds = np.array([fp.intensity_std[0] for fp in with_fg])
    mean = float((n * means).sum() / n.sum())
    std = float(np.sqrt((n * (stds**2 + (means - mean) ** 2)).sum() / n.sum()))
    # The widest of the sites' ranges: an average of percentiles would clip away the foreground of a site
    # whose scanner reads brighter (CT's Hounsfield scale makes the sites' ranges close anyway).
    low = min(fp.intensity_p005[0] for fp in with_fg)
    high = max(fp.intensity_p995[0] for fp in with_fg)
    clip = base.clip or (low, max(high, low + 1e-3))
    return {"clip": tuple(clip), "mean": base.mean if base.std > 0 else mean, "std": base.std or max(std, 1e-6)}


def plan_text(plan: PlanConfig) -> str:
    """The plan as it travels to the sites: JSON of the ``plan`` config section."""
    return json.dumps(dataclasses.asdict(plan), sort_keys=True)


def read_plan_text(text: object, who: str) -> PlanConfig:
    """A decided plan from its JSON (:func:`plan_text`), checked like any config; ``who`` sent it.

    Raises:
        ConfigError: not JSON of a plan, an invalid value, or a plan that is not decided.
    """
    try:
        values = json.loads(str(text))
    except ValueError:
        raise ConfigError(f"{who}'s plan is not JSON") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{who}'s plan is not a JSON object")
    plan = build_config({"plan": values}).plan
    if not plan.decided:
        raise ConfigError(f"{who}'s plan is not decided ({describe_values(plan)})")
    return plan


def describe_values(plan: PlanConfig) -> str:
    return ", ".join(f"{f.name}={getattr(plan, f.name)!r}" for f in dataclasses.fields(plan))


@dataclass(frozen=True)
class Misfit:
    """Why data do not fit a plan: ``kind`` is ``modality`` or ``dimensions`` (a model of the plan cannot
    read them) or ``spacing`` (far off the target: resampling would change them a lot); ``str()`` says it."""

    kind: str
    reason: str

    def __str__(self) -> str:
        return self.reason


def fit_problem(fp: Fingerprint, plan: PlanConfig) -> Misfit | None:
    """Why a site's data do not fit the plan (None when they do): another modality, other dimensions,
    or a median spacing more than ``plan.max_spacing_ratio`` times off the target on some axis."""
    if fp.modality not in (plan.modality, UNKNOWN) and plan.modality != UNKNOWN:
        return Misfit("modality", f"its scans are {fp.modality}, the run's plan is for {plan.modality}")
    if len(fp.spacing_median) != len(plan.target_spacing):
        dims = len(fp.spacing_median)
        return Misfit("dimensions", f"its scans are {dims}D, the plan is for {len(plan.target_spacing)}D")
    ratio = plan.max_spacing_ratio
    for axis, (own, target) in enumerate(zip(fp.spacing_median, plan.target_spacing)):
        if not 1 / ratio <= own / target <= ratio:
            return Misfit(
                "spacing",
                f"its median spacing {_mm(fp.spacing_median)} is more than {ratio:g}x off the plan's "
                f"{_mm(plan.target_spacing)} along axis {axis} (plan.max_spacing_ratio)",
            )
    return None


def _mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in values) + " mm"


def describe(plan: PlanConfig) -> str:
    """One line: the plan's modality, spacing and normalisation."""
    norm = plan.normalization
    if norm == "ct":
        norm += f" (clip {plan.clip[0]:g}..{plan.clip[1]:g}, mean {plan.mean:g}, std {plan.std:g})"
    size = "x".join(map(str, plan.input_size)) or "?"
    if plan.resizes:
        return f"{plan.modality}, 2D images resized to {size}, {norm}"
    return f"{plan.modality}, {_mm(plan.target_spacing)} ({plan.interpolation}), {norm}, input {size}"


def normalize(image: np.ndarray, plan: PlanConfig) -> np.ndarray:
    """The plan's intensity normalisation of one image ``[C, *spatial]`` -> float32, same shape."""
    if plan.normalization == "ct":
        low, high = plan.clip
        return ((np.clip(image, low, high) - plan.mean) / plan.std).astype(np.float32)
    return normalize_intensity(image)


def prepare(sample: Sample, plan: PlanConfig, max_voxels: int | None = None, where: str = "") -> Sample:
    """One case on the plan's grid and scale: a 3D case is reoriented to RAS and resampled to
    ``plan.target_spacing`` (image with ``plan.interpolation``, label nearest; where its own or the target
    spacing is anisotropic, the thick-slice axis on its own, nearest), then normalised.
    A 2D image is resized to ``plan.input_size`` (``plan.image_fit=resize``: image bilinear with
    antialiasing, label nearest; the affine scaled to match) or keeps its pixels (``window``), then normalised.

    Returns:
        A new sample: image float32 ``[C, *planned]``, label int64 ``[*planned]`` or None, the planned affine.

    Raises:
        ConfigError: a plan that is not decided, or for other dimensions than the case's.
        DataError: on the plan's grid the case would hold more than ``max_voxels`` values (a header that
            claims 40 mm voxels, resampled to 1 mm), refused before anything is allocated; the message
            starts with ``where`` (the case's file), else the case's name.
    """
    if not plan.decided:
        raise ConfigError(f"the plan is not decided yet ({plan}): decide_plan first")
    image, label, affine = sample.image, sample.label, sample.affine
    if image.ndim == 4:
        if len(plan.target_spacing) != 3:
            raise ConfigError(f"plan.target_spacing={plan.target_spacing} is not 3D, case {sample.name} is")
        shape, affine = planned_grid(image.shape[1:], sample.affine, plan.target_spacing)
        planned = math.prod(shape) * image.shape[0]
        if max_voxels is not None and planned > max_voxels:
            raise DataError(
                f"{where or sample.name}: on the plan's {_mm(plan.target_spacing)} grid it would hold {planned:,} voxels "
                f"{tuple(shape)} (its own grid: {tuple(image.shape[1:])}), above data.max_voxels={max_voxels:,}"
            )
        own = spacing_of(canonical_grid(image.shape[1:], sample.affine)[1])
        thick = low_resolution_axis(own, plan.target_spacing)  # resampled on its own, nearest (nnU-Net)
        image = to_grid(image, sample.affine, shape, affine, SPLINE_ORDER[plan.interpolation], separate_axis=thick)
        if label is not None:
            label = to_grid(label[None], sample.affine, shape, affine, order=0, fill=0)[0]
    elif plan.resizes and tuple(image.shape[1:]) != tuple(plan.input_size):
        size = tuple(plan.input_size)
        affine = affine @ _scaling(image.shape[1:], size)
        image = resize(image, size)
        if label is not None:
            label = resize(label[None].astype(np.float32), size, nearest=True)[0].astype(label.dtype)
    return dataclasses.replace(sample, image=normalize(image, plan), label=label, affine=affine)


def resize(array: np.ndarray, size: Sequence[int], nearest: bool = False) -> np.ndarray:
    """``[C, *S]`` -> float32 ``[C, *size]``: bilinear with antialiasing (the pixel centres kept in place), or
    nearest for labels."""
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]  # [1, C, *S]
    if nearest:
        out = F.interpolate(x, size=tuple(size), mode="nearest-exact")
    else:
        out = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].numpy()


def _scaling(own: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``(4, 4)``: a resized image's pixel indices -> the original image's (pixel centres, as
    :func:`resize` places them)."""
    m = np.eye(4)
    for axis, (n, k) in enumerate(zip(own, size)):
        m[axis, axis] = n / k
        m[axis, 3] = (n / k - 1) / 2
    return m


def restore(probabilities: np.ndarray, planned_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray):
    """Class probabilities ``[K, *planned]`` on the plan's grid -> ``[K, *shape]`` on the scan's own grid
    (linear; exact when the plan only reoriented). 2D: resized back to the image's own pixels when the
    plan resized it, else returned as they are."""
    if probabilities.ndim == 3 and tuple(probabilities.shape[1:]) != tuple(shape):
        x = torch.from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32))[None]
        return F.interpolate(x, size=tuple(shape), mode="bilinear", align_corners=False)[0].numpy()
    if probabilities.ndim != 4:
        return probabilities
    return to_grid(probabilities, planned_affine, shape, affine, order=1)
