"""Checking a dataset folder before training: every case is read and every problem listed."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from amlp_core.data.cases import Case, DatasetIndex, discover, read_case_label
from amlp_core.data.io import read_image
from amlp_core.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class Problem:
    """One thing wrong with one file."""

    file: str
    message: str
    severity: str = "error"  # "error" | "warning"


@dataclass
class DataReport:
    """Outcome of :func:`check_dataset`; ``ok`` when there is no error (warnings allowed)."""

    root: str
    fmt: str
    n_cases: int
    n_labelled: int
    problems: list[Problem] = field(default_factory=list)

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
        """Header, one ``ERROR <file>: <message>`` line per problem, summary line."""
        lines = [f"Dataset {self.root} (format {self.fmt}): {self.n_cases} cases, {self.n_labelled} labelled"]
        lines += [f"{p.severity.upper()} {p.file}: {p.message}" for p in self.problems]
        verdict = "OK" if self.ok else "NOT USABLE"
        lines.append(f"{verdict}: {len(self.errors)} errors, {len(self.warnings)} warnings")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _problem(path: Path | None, exc: DataError) -> Problem:
    """Error Problem for ``path``, without repeating the path at the start of the message."""
    message, prefix = str(exc), f"{path}: "
    return Problem(str(path), message.removeprefix(prefix))


def _check_image(case: Case, spatial_dims: int) -> tuple[np.ndarray | None, list[Problem]]:
    """The image ``[C, *spatial]`` (None if unusable) and its problems."""
    try:
        image, _ = read_image(case.image)
    except DataError as exc:
        return None, [_problem(case.image, exc)]
    if image.ndim - 1 != spatial_dims:
        dims = f"image has {image.ndim - 1} spatial dims, expected {spatial_dims}"
        return None, [Problem(str(case.image), dims)]  # its shape says nothing about the label's
    if image.min() == image.max():
        return image, [Problem(str(case.image), "image is constant", "warning")]
    return image, []


def _check_label(case: Case, image: np.ndarray | None, allowed: set[int] | None, spatial_dims: int):
    """Problems of the label map ``[*spatial]`` of ``case`` against its image ``[C, *spatial]``."""
    try:
        label = read_case_label(case)
    except DataError as exc:
        return [_problem(case.label, exc)]
    problems, file = [], str(case.label)
    if label.ndim != spatial_dims:
        problems.append(Problem(file, f"label has {label.ndim} spatial dims, expected {spatial_dims}"))
    if image is not None and label.shape != image.shape[1:]:
        problems.append(Problem(file, f"label shape {label.shape} does not match image {image.shape[1:]}"))
    bad = [int(v) for v in np.unique(label) if (v not in allowed if allowed is not None else v < 0)]
    if bad:
        declared = f"declared classes {sorted(allowed)}" if allowed is not None else "non-negative values"
        problems.append(Problem(file, f"label values {bad[:10]} outside {declared}"))
    return problems


def check_dataset(
    root: str | os.PathLike,
    fmt: str = "auto",
    num_classes: int | None = None,
    label_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> DataReport:
    """Read every case of the dataset in ``root`` and report what is wrong; never raises for data.

    Args:
        root, fmt, label_dir: as for :func:`~amlp_core.data.cases.discover`.
        num_classes: allowed label values ``0..num_classes-1`` when the dataset declares none.
        limit: check only the first ``limit`` cases (sorted by name).
    """
    try:
        index: DatasetIndex = discover(root, fmt, label_dir)
    except DataError as exc:
        return DataReport(str(root), fmt, 0, 0, [_problem(Path(root), exc)])
    cases = index.cases[:limit]
    allowed = set(index.class_names) if index.class_names else None
    if allowed is None and num_classes is not None:
        allowed = set(range(num_classes))
    problems = []
    for case in tqdm(cases, desc="Checking", unit="case", disable=None):
        image, image_problems = _check_image(case, index.spatial_dims)
        problems += image_problems
        if case.label is not None:
            problems += _check_label(case, image, allowed, index.spatial_dims)
    n_labelled = sum(c.label is not None for c in cases)
    report = DataReport(str(index.root), index.fmt, len(cases), n_labelled, problems)
    logger.info("%s: %d cases checked, %d errors", root, len(cases), len(report.errors))
    return report
