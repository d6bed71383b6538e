"""Checking the cases of a dataset: one set of checks for ``fedamlp data check`` (every problem listed)
and for every command that reads data (:func:`~amlp_core.data.dataset.load_samples`: refuse or skip)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from amlp_core.data.cases import (
    Case,
    DatasetIndex,
    Problem,
    Sample,
    discover,
    label_is_seg,
    read_case_image,
    read_case_label,
)
from amlp_core.data.dicom import describe
from amlp_core.data.duplicates import duplicate_groups, thumbnail
from amlp_core.data.io import label_affine
from amlp_core.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Expect:
    """What every case of a dataset must be."""

    spatial_dims: int
    classes: frozenset[int] | None = None  # the allowed label values (None: any non-negative value)
    channels: int | None = None  # image channels (None: not checked case by case)
    max_voxels: int | None = None  # values a file's header may declare (None: no limit)


@dataclass
class DataReport:
    """Outcome of :func:`check_dataset`; ``ok`` when there is no error (warnings allowed).

    ``series``: of a DICOM dataset, one :func:`~amlp_core.data.dicom.describe` dict per usable series
    (folder, modality, slices, shape, spacing, orientation) with its ``problems`` (messages); the series
    refused for an error appear only in ``problems``, named by their folder.
    """

    root: str
    fmt: str
    n_cases: int
    n_labelled: int
    problems: list[Problem] = field(default_factory=list)
    series: list[dict] = field(default_factory=list)
    contents: Contents | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self) -> str:
        """Header, one ``SERIES <folder>: ...`` line per DICOM series, one ``ERROR <file>: <message>`` line
        per problem, summary line."""
        lines = [f"Dataset {self.root} (format {self.fmt}): {self.n_cases} cases, {self.n_labelled} labelled"]
        lines += [_series_line(s) for s in self.series]
        lines += self.contents.lines(self.n_labelled) if self.contents is not None else []
        lines += [f"{p.severity.upper()} {p.file}: {p.message}" for p in self.problems]
        verdict = "OK" if self.ok else "NOT USABLE"
        lines.append(f"{verdict}: {len(self.errors)} errors, {len(self.warnings)} warnings")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class Contents:
    """What a dataset holds, over its readable cases: counts per category (class sub-folder), labelled
    cases with an empty label (normal images), cases with several masks, the size range in voxels per
    axis, and the near-duplicate groups (2D images, :mod:`~amlp_core.data.duplicates`)."""

    categories: dict[str, int] = field(default_factory=dict)
    empty_labels: int = 0
    several_masks: list[str] = field(default_factory=list)
    size_min: list[int] = field(default_factory=list)
    size_max: list[int] = field(default_factory=list)
    size_median: list[float] = field(default_factory=list)
    duplicate_threshold: float | None = None  # None: not looked for (3D data)
    duplicate_groups: list[list[str]] = field(default_factory=list)

    def lines(self, labelled: int) -> list[str]:
        """The summary lines of ``fedamlp data check`` (``labelled``: the labelled cases checked)."""
        out = []
        if self.categories:
            out.append("Categories: " + ", ".join(f"{k} {n}" for k, n in sorted(self.categories.items())))
        if self.size_min:
            axes = " x ".join(f"{lo}..{hi}" for lo, hi in zip(self.size_min, self.size_max))
            median = " x ".join(f"{m:g}" for m in self.size_median)
            unit = "pixels (rows x columns)" if len(self.size_min) == 2 else "voxels"
            out.append(f"Sizes: {axes} {unit} (median {median})")
        if labelled:
            out.append(f"Labelled cases with an empty label (no lesion): {self.empty_labels}")
        if self.several_masks:
            shown = ", ".join(self.several_masks[:5]) + (", ..." if len(self.several_masks) > 5 else "")
            out.append(f"Cases with several masks (joined into one label): {len(self.several_masks)} ({shown})")
        if self.duplicate_threshold is not None:
            images = sum(map(len, self.duplicate_groups))
            out.append(
                f"Near-duplicates: {len(self.duplicate_groups)} groups of {images} images "
                f"(thumbnail correlation > {self.duplicate_threshold:g}; each group stays on one side of a split)"
            )
            out += [f"DUPLICATES {', '.join(g)}" for g in self.duplicate_groups]
        return out


def _series_line(s: dict) -> str:
    shape, spacing = "x".join(str(n) for n in s["shape"]), " x ".join(f"{v:.4g}" for v in s["spacing"])
    named = f" {s['description']!r}" if s["description"] else ""
    line = f"SERIES {s['folder']}: {s['modality']}{named}, {s['slices']} slices, {shape} voxels, "
    line += f"spacing {spacing} mm, orientation {s['orientation']}"
    return line + (f", {len(s['problems'])} problem(s)" if s["problems"] else "")


def _problem(path: Path | None, exc: DataError) -> Problem:
    """Error Problem for ``path``, without repeating the path at the start of the message."""
    message, prefix = str(exc), f"{path}: "
    return Problem(str(path), message.removeprefix(prefix))


def _same_geometry(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two (4, 4) affines place voxels alike (to a thousandth of a voxel side, or of a mm)."""
    return bool(np.allclose(a, b, rtol=0, atol=1e-3 * max(1.0, float(np.abs(a[:3, :3]).max()))))


def _image_problems(case: Case, image: np.ndarray, expect: Expect) -> list[Problem]:
    file, problems = str(case.image), []
    if image.ndim - 1 != expect.spatial_dims:
        problems.append(Problem(file, f"image has {image.ndim - 1} spatial dims, expected {expect.spatial_dims}"))
    if expect.channels is not None and image.shape[0] != expect.channels:
        problems.append(Problem(file, f"image has {image.shape[0]} channel(s), expected {expect.channels}"))
    if image.min() == image.max():
        problems.append(Problem(file, "image is constant", "warning"))
    return problems


def _label_problems(case: Case, label: np.ndarray, image: np.ndarray, affine: np.ndarray, expect: Expect):
    """Problems of the label map ``[*spatial]`` of ``case`` against its image ``[C, *spatial]``."""
    assert case.label is not None
    problems, file = [], str(case.label)
    if label.ndim != expect.spatial_dims:
        problems.append(Problem(file, f"label has {label.ndim} spatial dims, expected {expect.spatial_dims}"))
    if label.shape != image.shape[1:]:
        problems.append(Problem(file, f"label shape {label.shape} does not match image {image.shape[1:]}"))
    elif not label_is_seg(case) and not _same_geometry(label_affine(case.label), affine):  # a SEG has its image's
        problems.append(Problem(file, "label geometry (affine) differs from its image's: they do not overlay"))
    allowed = expect.classes
    bad = [int(v) for v in np.unique(label) if (v not in allowed if allowed is not None else v < 0)]
    if bad:
        declared = f"the classes {sorted(allowed)}" if allowed is not None else "non-negative values"
        problems.append(Problem(file, f"label values {bad[:10]} outside {declared}"))
    return problems


def inspect_case(case: Case, expect: Expect, with_label: bool = True) -> tuple[Sample | None, list[Problem]]:
    """Read one case and check it against ``expect`` and itself (image and label shape and geometry).

    Returns:
        ``(sample, problems)``: the sample (image float32 ``[C, *spatial]`` as read, label int64
        ``[*spatial]`` or None) when no problem is an error, else None; and every problem found.
    """
    try:
        image, affine = read_case_image(case, expect.max_voxels)
    except DataError as exc:
        return None, [_problem(case.image, exc)]
    problems = _image_problems(case, image, expect)
    label = None
    if with_label and case.label is not None and image.ndim - 1 == expect.spatial_dims:
        try:
            label = read_case_label(case, expect.max_voxels)
            problems += _label_problems(case, label, image, affine, expect)
        except DataError as exc:
            problems.append(_problem(case.label, exc))
    if any(p.severity == "error" for p in problems):
        return None, problems
    return Sample(case.name, image, label, affine, category=case.category), problems


def check_dataset(
    root: str | os.PathLike,
    fmt: str = "auto",
    num_classes: int | None = None,
    label_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    max_voxels: int | None = None,
    near_duplicates: float = 0.95,
) -> DataReport:
    """Read every case of the dataset in ``root`` and report every problem and what it holds; never
    raises for data.

    Args:
        root, fmt, label_dir: as for :func:`~amlp_core.data.cases.discover`.
        num_classes: allowed label values ``0..num_classes-1`` when the dataset declares none.
        limit: check only the first ``limit`` cases (sorted by name).
        max_voxels: values a file's header may declare (``data.max_voxels``).
        near_duplicates: thumbnail correlation above which two 2D images are near-duplicates
            (``data.near_duplicates``; 1: not looked for).

    Besides each case's own problems, images whose channel count differs from most cases' are errors.
    """
    try:
        index: DatasetIndex = discover(root, fmt, label_dir)
    except DataError as exc:
        return DataReport(str(root), fmt, 0, 0, [_problem(Path(root), exc)])
    cases = index.cases[:limit]
    expect = Expect(index.spatial_dims, classes_of(index, num_classes), None, max_voxels)
    problems, channels = list(index.problems), {}
    look_for_duplicates = index.spatial_dims == 2 and near_duplicates < 1
    sizes, names, thumbs, empty = [], [], [], 0
    for case in tqdm(cases, desc="Checking", unit="case", disable=None):
        sample, found = inspect_case(case, expect)
        problems += found
        if sample is not None:
            channels[case] = sample.image.shape[0]
            sizes.append(sample.image.shape[1:])
            empty += sample.label is not None and not sample.label.any()
            if look_for_duplicates:
                names.append(case.name)
                thumbs.append(thumbnail(sample.image))
    if channels:
        usual = Counter(channels.values()).most_common(1)[0][0]
        problems += [
            Problem(str(c.image), f"image has {n} channel(s), most cases have {usual}")
            for c, n in channels.items()
            if n != usual
        ]
    n_labelled = sum(c.label is not None for c in cases)
    series = [
        {**describe(s), "problems": [p.message for p in problems if p.file == str(s.folder)]} for s in index.series
    ]
    shapes = [s for s in sizes if len(s) == len(sizes[0])] if sizes else []
    contents = Contents(
        categories=dict(Counter(c.category for c in cases if c.category is not None)),
        empty_labels=int(empty),
        several_masks=[c.name for c in cases if c.extra_labels],
        size_min=[int(v) for v in np.min(shapes, axis=0)] if shapes else [],
        size_max=[int(v) for v in np.max(shapes, axis=0)] if shapes else [],
        size_median=[float(v) for v in np.median(shapes, axis=0)] if shapes else [],
        duplicate_threshold=near_duplicates if look_for_duplicates else None,
        duplicate_groups=duplicate_groups(names, np.stack(thumbs), near_duplicates) if thumbs else [],
    )
    report = DataReport(str(index.root), index.fmt, len(cases), n_labelled, problems, series, contents)
    logger.info("%s: %d cases checked, %d errors", root, len(cases), len(report.errors))
    return report


def classes_of(index: DatasetIndex, num_classes: int | None) -> frozenset[int] | None:
    """The label values a dataset allows: its declared classes, else ``0..num_classes-1`` (None: unknown)."""
    if index.class_names:
        return frozenset(index.class_names)
    return frozenset(range(num_classes)) if num_classes is not None else None


def refuse_or_skip(problems: list[Problem], policy: str, where: str) -> None:
    """Apply ``data.on_bad_case`` to the error ``problems`` of the dataset ``where``.

    Raises:
        DataError: with ``refuse``, naming the first bad file and counting the rest.
    """
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return
    if policy == "refuse":
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise DataError(
            f"{errors[0].file}: {errors[0].message}{more}; list them all with `fedamlp data check {where}`, "
            "or leave bad cases out with data.on_bad_case=skip"
        )
    for p in errors:
        logger.warning("skipping a bad case (data.on_bad_case=skip): %s: %s", p.file, p.message)
