"""The data of a run: its cases read, checked against the model, and cut into training and test by case.

Also the settings that follow from the data (:func:`data_defaults`: the presets of :mod:`amlp_core.presets`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from amlp_core.config import Config, PlanConfig
from amlp_core.data import (
    DatasetIndex,
    Expect,
    Sample,
    discover,
    load_samples,
    make_phantom_samples,
    partition_names,
    split_names,
    to_slices,
)
from amlp_core.data.duplicates import find_near_duplicates, group_names
from amlp_core.data.plan import (
    Fingerprint,
    PlanMisfit,
    decide_plan,
    fingerprint,
    fit_problem,
    planned_config,
    prepare,
)
from amlp_core.errors import ConfigError, DataError
from amlp_core.presets import LESION_IMAGES, ROI, VOLUMES, phantoms

log = logging.getLogger(__name__)


@dataclass
class DataSplit:
    """A dataset cut into a training and a test part by case (never by slice).

    As read (:func:`read_split`): each case on its own grid with its own intensities, and the site's
    ``fingerprint``; on the run's plan (:func:`plan_split`): every case prepared, and the ``plan``.
    """

    train: list[Sample]
    test: list[Sample]
    class_names: dict[int, str]
    fingerprint: Fingerprint | None = None
    plan: PlanConfig | None = None


def load_split(cfg: Config, site: int = 0, num_sites: int = 1) -> DataSplit:
    """:func:`read_split`, then :func:`plan_split` on ``cfg.plan`` when it is decided (a saved model's
    plan), else on the plan decided from this data's own fingerprint (a single-site run).

    Raises:
        DataError: unreadable data; PlanError: data that do not fit a given plan.
        ConfigError: data that does not fit the model.
    """
    raw = read_split(cfg, site, num_sites)
    assert raw.fingerprint is not None
    plan = cfg.plan
    if not plan.decided:
        plan = decide_plan({cfg.data.path: raw.fingerprint}, cfg.plan, cfg.model.img_size, cfg.input_step)
    return plan_split(raw, plan, cfg)


def with_plan(cfg: Config, split: DataSplit) -> Config:
    """``cfg`` on the plan its data were prepared on (:func:`~amlp_core.data.plan.planned_config`): the
    config a run builds its networks from and saves with its model."""
    return planned_config(cfg, split.plan) if split.plan is not None else cfg


def plan_split(raw: DataSplit, plan: PlanConfig, cfg: Config) -> DataSplit:
    """Every case of ``raw`` brought onto ``plan`` (:func:`~amlp_core.data.plan.prepare`), then cut into
    slices when ``data.as_slices``.

    Raises:
        PlanMisfit: the data do not fit the plan (another modality, a spacing far off), naming the data.
        PlanError: a case cannot be brought onto it (naming the case).
    """
    assert raw.fingerprint is not None
    problem = fit_problem(raw.fingerprint, plan)  # (the one check of the data's fit: a site's too)
    if problem:
        raise PlanMisfit(f"{cfg.data.path}: does not fit the run's plan: {problem}", problem)
    where = {s.name: f"{cfg.data.path}, case {s.name}" for s in (*raw.train, *raw.test)}
    train = [prepare(s, plan, cfg.data.max_voxels, where[s.name]) for s in raw.train]
    test = [prepare(s, plan, cfg.data.max_voxels, where[s.name]) for s in raw.test]
    if cfg.data.as_slices:
        train = to_slices(train, cfg.data.slice_axis)
    return DataSplit(train, test, raw.class_names, raw.fingerprint, plan)


def site_case_names(
    cfg: Config, index: DatasetIndex, groups: dict[str, str], num_sites: int = 1
) -> list[tuple[list[str], list[str]]]:
    """The ``(training, test)`` case names of each of ``num_sites`` sites of ``index``'s data: the fixed
    train/test split (test cases from the labelled ones, near-duplicate ``groups`` whole, each category its
    share; unlabelled images all train), then, for a simulated federation, cut by ``federation.partition``.

    Raises:
        ConfigError: more sites than cases to deal them (naming ``federation.sites``).
    """
    d, f = cfg.data, cfg.federation
    strata = {c.name: c.category for c in index.cases if c.category is not None} or None
    labelled = [c.name for c in index.cases if c.label is not None]
    train, test = split_names(labelled, d.test_fraction, d.split_seed, groups, strata) if labelled else ([], [])
    train = sorted(train + [c.name for c in index.cases if c.label is None])
    if num_sites == 1:
        return [(train, test)]
    try:
        trains = partition_names(
            train, num_sites, f.partition, f.dirichlet_alpha, d.split_seed, groups=groups, categories=strata
        )
        # (fewer test cases than sites: a site may hold none, and is not asked to evaluate)
        tests = (
            partition_names(test, num_sites, "iid", seed=d.split_seed, min_per_site=0, groups=groups) if test else None
        )
    except ConfigError as e:
        raise ConfigError(
            f"invalid federation.sites={num_sites} for {d.path} ({len(train)} training and {len(test)} test cases): {e}"
        ) from None
    return [(trains[k], tests[k] if tests else []) for k in range(num_sites)]


def read_split(cfg: Config, site: int = 0, num_sites: int = 1) -> DataSplit:
    """Read (or synthesise) the data named by ``cfg.data`` and split it by case, each case as read.

    The test cases are drawn from the labelled cases only; images without a label all go to training,
    where pretraining uses every image and fine-tuning the labelled ones.

    With ``num_sites > 1`` (a simulated federation) the fixed train/test split is cut into
    sites by ``cfg.federation.partition`` and only site ``site``'s cases are read; synthetic
    phantoms are generated per site instead, each site with its own scanner style.

    Raises:
        DataError: unreadable data, naming the file.
        ConfigError: data that does not fit the model (dimensions, channels, classes).
    """
    d, m = cfg.data, cfg.model
    if d.synthetic:
        samples = make_phantom_samples(
            d.synthetic_cases, d.synthetic_size, seed=d.split_seed, site=site if num_sites > 1 else d.synthetic_site
        )
        class_names, dims = {0: "background", 1: "lesion"}, len(d.synthetic_size)
        modality = "MR" if d.modality == "auto" else d.modality
        train_names, test_names = split_names([s.name for s in samples], d.test_fraction, d.split_seed)
        _check_fits(class_names, dims, cfg, samples)
    else:
        index = discover(d.path, d.format)
        modality = index.modality if d.modality == "auto" else d.modality
        class_names = index.class_names or {k: f"class_{k}" for k in range(m.num_classes)}
        dims = index.spatial_dims
        _check_fits(class_names, dims, cfg)  # before reading: the model cannot take data of another kind
        groups = near_duplicate_groups(index, cfg)
        train_names, test_names = site_case_names(cfg, index, groups, num_sites)[site]
        wanted = set(train_names) | set(test_names)
        index = dataclasses.replace(index, cases=tuple(c for c in index.cases if c.name in wanted))
        expect = Expect(dims, frozenset(class_names), m.in_channels, d.max_voxels)
        samples = load_samples(index, expect, d.on_bad_case)  # (each case's channels checked against the model)
        samples = [dataclasses.replace(s, group=groups.get(s.name, "")) for s in samples]
    by_name = {s.name: s for s in samples}  # (data.on_bad_case=skip may have left cases out)
    train = [by_name[n] for n in train_names if n in by_name]
    test = [by_name[n] for n in test_names if n in by_name]
    # The fingerprint sums up every case the site holds (train and test), never one case alone.
    return DataSplit(train, test, class_names, fingerprint(train + test, modality, d.split_seed))


def near_duplicate_groups(index: DatasetIndex, cfg: Config) -> dict[str, str]:
    """``{case name: group name}`` of the near-duplicate 2D images of ``index`` (none for 3D data, or with
    ``data.near_duplicates=1``)."""
    if index.spatial_dims != 2 or cfg.data.near_duplicates >= 1:
        return {}
    return group_names(find_near_duplicates(index, cfg.data.near_duplicates, cfg.data.max_voxels))


def _check_fits(class_names: dict[int, str], dims: int, cfg: Config, samples: Sequence[Sample] = ()) -> None:
    """ConfigError when data of ``dims`` spatial dims, these classes and the ``samples``' channels
    do not fit the model."""
    d, m = cfg.data, cfg.model
    if d.as_slices and dims == 3:
        dims = 2
    if dims != m.spatial_dims:
        raise ConfigError(
            f"data at {d.path} is {dims}D but model.spatial_dims={m.spatial_dims} "
            f"(use --dims {dims}, or data.as_slices for 3D volumes in a 2D model)"
        )
    channels = {s.image.shape[0] for s in samples}
    if channels and channels != {m.in_channels}:
        raise ConfigError(f"data at {d.path} has {sorted(channels)} channel(s) but model.in_channels={m.in_channels}")
    if len(class_names) != m.num_classes:
        raise ConfigError(
            f"data at {d.path} declares {len(class_names)} classes {class_names} but model.num_classes={m.num_classes}"
        )


def data_defaults(
    path: str, fmt: str = "auto", dims: int | None = None, as_slices: bool = False, num_classes: Any = None
) -> dict[str, Any]:
    """Model and data settings that follow from the data, as flat config overrides.

    The built-in phantoms get a model of their own size with two classes (:func:`~amlp_core.presets.phantoms`);
    a dataset gets its class count from its labels (or ``num_classes``, the user's ``model.num_classes``, for
    data that name no classes: unlabelled folders) and the region of interest of its kind
    (:data:`~amlp_core.presets.ROI`); 2D lesion images (PNG) their post-processing
    (:data:`~amlp_core.presets.LESION_IMAGES`); 3D scans mirrored inference (:data:`~amlp_core.presets.VOLUMES`).
    """
    if path == "synthetic":
        return phantoms(dims or 3)
    index = discover(path, fmt)
    if index.class_names is None and num_classes is None:
        raise DataError(f"{path}: no class names found; pass --set model.num_classes=K")
    data_dims = index.spatial_dims
    if dims is None:
        dims = 2 if as_slices else data_dims
    if dims == 2 and data_dims == 3:
        as_slices = True
    size = ROI["volume" if dims == 3 else ("slices" if as_slices else "image")]
    return {
        "model.spatial_dims": dims,
        "model.img_size": size,
        "model.num_classes": len(index.class_names) if index.class_names is not None else num_classes,
        "data.as_slices": as_slices,
        "data.path": path,
        "data.format": fmt,
        **(LESION_IMAGES if index.fmt == "png" else {}),
        **(VOLUMES if dims == 3 else {}),
    }
