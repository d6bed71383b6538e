"""Finding the image/label pairs of a dataset folder.

Layouts: ``msd`` (a Medical Segmentation Decathlon ``dataset.json``), ``nifti`` (a folder of
NIfTI images, labels in ``root/images`` + ``root/labels`` or in a ``label_dir`` with the same
file names) and ``png`` (BUSI: ``x.png`` with ``x_mask.png`` and extra ``x_mask_1.png``, ...).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amlp_core.data.io import NIFTI_SUFFIXES, data_error, file_suffix, read_label, strip_suffix

logger = logging.getLogger(__name__)

FORMATS = ("auto", "msd", "nifti", "png")
_MASK_STEM = re.compile(r"^(?P<image>.+)_mask(?:_\d+)?$")


@dataclass(frozen=True)
class Case:
    """One image file and its optional label file."""

    name: str
    image: Path
    label: Path | None


@dataclass
class Sample:
    """One image held in memory."""

    name: str
    image: np.ndarray  # float32 [C, *spatial] (normalised once loaded for training)
    label: np.ndarray | None  # int64 [*spatial]
    affine: np.ndarray  # float64 (4, 4)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    file: str
    message: str
    severity: str = "error"  # "error" | "warning"


@dataclass(frozen=True)
class DatasetIndex:
    """The cases of one dataset folder, sorted by name, and the entries that are not usable cases
    (a listed file that is missing, a duplicate, a path outside the folder)."""

    root: Path
    fmt: str
    cases: tuple[Case, ...]
    class_names: dict[int, str] | None
    spatial_dims: int
    problems: tuple[Problem, ...] = ()


def discover(root: str | os.PathLike, fmt: str = "auto", label_dir: str | os.PathLike | None = None) -> DatasetIndex:
    """List the cases of the dataset in ``root``.

    ``fmt="auto"`` picks msd when ``dataset.json`` exists, else png when any .png file
    exists, else nifti. ``label_dir`` is for nifti folders with the images directly in ``root``.

    Entries that cannot be cases (a listed file that does not exist, the same file or name twice, a
    path outside ``root``) are left out and each is named in ``problems``.

    Raises:
        DataError: missing or empty folder, unknown format, no images or bad dataset.json.
    """
    root = Path(root)
    if not root.is_dir():
        raise data_error(root, "dataset folder does not exist")
    if not any(root.iterdir()):
        raise data_error(root, "dataset folder is empty")
    if fmt not in FORMATS:
        raise data_error(root, f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = _detect_format(root)
    class_names, spatial_dims, problems = None, 3, list[Problem]()
    if fmt == "msd":
        cases, problems, class_names, spatial_dims = _discover_msd(root)
    elif fmt == "png":
        cases, class_names, spatial_dims = _discover_png(root), {0: "background", 1: "lesion"}, 2
    else:
        cases, problems = _discover_nifti(root, None if label_dir is None else Path(label_dir))
    if not cases and not problems:
        raise data_error(root, f"no {fmt} images found")
    n_labelled = sum(c.label is not None for c in cases)
    logger.info("%s: %d %s cases, %d labelled, %d bad entries", root, len(cases), fmt, n_labelled, len(problems))
    ordered = tuple(sorted(cases, key=lambda c: c.name))
    return DatasetIndex(root, fmt, ordered, class_names, spatial_dims, tuple(problems))


def _detect_format(root: Path) -> str:
    if (root / "dataset.json").is_file():
        return "msd"
    return "png" if next(root.rglob("*.png"), None) is not None else "nifti"


def _discover_msd(root: Path) -> tuple[list[Case], list[Problem], dict[int, str] | None, int]:
    """Cases, bad entries, class names and spatial dims from ``root/dataset.json``."""
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
        entries = list(meta["training"])
        class_names = {int(k): str(v) for k, v in meta["labels"].items()} if "labels" in meta else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise data_error(meta_path, f"not a valid MSD dataset.json ({type(exc).__name__}: {exc})") from exc
    spatial_dims = 2 if str(meta.get("tensorImageSize", "3D")).upper() == "2D" else 3
    # Unlabelled images: MSD's "test" list (paths, or entries with an image only); their labels are not used.
    test = meta.get("test") if isinstance(meta.get("test"), list) else []
    listing = [(f"training entry {i}", e) for i, e in enumerate(entries)]
    listing += [(f"test entry {i}", _image_only(e)) for i, e in enumerate(test)]
    cases, problems = [], []
    listed: dict[Path, str] = {}  # every listed file, and the entry that listed it first
    names: dict[str, str] = {}
    for where, entry in listing:
        found = _msd_case(root, where, entry, meta_path)
        if isinstance(found, Case):
            found = _listed_twice(found, where, listed, names) or found
        if isinstance(found, Problem):
            problems.append(found)
            continue
        cases.append(found)
        listed.update({f: where for f in (found.image, found.label) if f is not None})
        names[found.name] = where
    return cases, problems, class_names, spatial_dims


def _image_only(entry: object) -> object:
    """A ``test`` entry of dataset.json (a path, or an entry) as an entry without a label."""
    if isinstance(entry, str):
        return {"image": entry}
    return {"image": entry.get("image")} if isinstance(entry, dict) else entry


def _listed_twice(case: Case, where: str, listed: dict[Path, str], names: dict[str, str]) -> Problem | None:
    """A problem when the entry ``where`` names a file or a case name that an earlier entry named."""
    for path in (case.image, case.label):
        if path is not None and path in listed:
            return Problem(str(path), f"listed again by {where} (first by {listed[path]})")
    if case.name in names:
        return Problem(str(case.image), f"case name {case.name!r} of {where} is also {names[case.name]}'s")
    return None


def _inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` when it stays inside ``root`` (read lexically: no absolute path, no ``..`` out)."""
    path = Path(os.path.normpath(root / relative))
    return path if not Path(relative).is_absolute() and path.is_relative_to(os.path.normpath(root)) else None


def _msd_case(root: Path, where: str, entry: object, meta_path: Path) -> Case | Problem:
    """The case of the entry ``where`` of ``meta_path``, or the problem that makes it none."""
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        return Problem(str(meta_path), f"{where} has no 'image' path")
    texts = [entry["image"]] + ([entry["label"]] if isinstance(entry.get("label"), str) else [])
    paths = []
    for text in texts:
        path = _inside(root, text)
        if path is None:
            return Problem(str(meta_path), f"{where} path {text!r} is outside the dataset folder")
        if not path.is_file():
            return Problem(str(path), f"listed in {meta_path.name} ({where}) but does not exist")
        paths.append(path)
    return Case(strip_suffix(paths[0]), paths[0], paths[1] if len(paths) > 1 else None)


def _nifti_files(folder: Path, problems: list[Problem]) -> dict[str, Path]:
    """Non-hidden NIfTI files directly in ``folder``, by name without suffix; a name that two files
    share (``x.nii`` and ``x.nii.gz``) is left out and added to ``problems``."""
    files: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and file_suffix(p) in NIFTI_SUFFIXES and not p.name.startswith("."):
            files.setdefault(strip_suffix(p), []).append(p)
    for name, paths in files.items():
        if len(paths) > 1:
            problems.append(Problem(str(paths[1]), f"has the same case name {name!r} as {paths[0].name}"))
    return {name: paths[0] for name, paths in files.items() if len(paths) == 1}


def _discover_nifti(root: Path, label_dir: Path | None) -> tuple[list[Case], list[Problem]]:
    image_dir = root
    if (root / "images").is_dir():
        image_dir, label_dir = root / "images", label_dir or root / "labels"
    elif label_dir is not None and not label_dir.is_dir():
        raise data_error(label_dir, "label folder does not exist")
    problems: list[Problem] = []
    labels = _nifti_files(label_dir, problems) if label_dir is not None and label_dir.is_dir() else {}
    cases = [Case(name, path, labels.get(name)) for name, path in _nifti_files(image_dir, problems).items()]
    unlabelled = [c.name for c in cases if c.label is None]
    if labels and unlabelled:
        logger.warning(
            "%s: no label file for %d of %d images (e.g. %s); they are used unlabelled",
            label_dir,
            len(unlabelled),
            len(cases),
            unlabelled[0],
        )
    return cases, problems


def _discover_png(root: Path) -> list[Case]:
    """Every ``x.png`` under ``root`` that is not a mask; its label is its first mask."""
    pngs = sorted(p for p in root.rglob("*.png") if not p.name.startswith("."))
    first_mask: dict[Path, Path] = {}
    for path in pngs:
        if match := _MASK_STEM.match(path.stem):
            first_mask.setdefault(path.with_stem(match["image"]), path)
    return [
        Case(image.relative_to(root).with_suffix("").as_posix(), image, first_mask.get(image))
        for image in pngs
        if not _MASK_STEM.match(image.stem)
    ]


def _png_masks(image: Path) -> list[Path]:
    """All masks of a PNG image, sorted: ``x_mask.png``, ``x_mask_1.png``, ..."""
    siblings = image.parent.glob("*.png")
    return sorted(p for p in siblings if (m := _MASK_STEM.match(p.stem)) and m["image"] == image.stem)


def read_case_label(case: Case, max_voxels: int | None = None) -> np.ndarray:
    """Label map of ``case`` as int64 ``[*spatial]``; several PNG masks are merged (union).

    Raises:
        DataError: the case has no label, or a mask is unreadable, too large or of another shape.
    """
    if case.label is None:
        raise data_error(case.image, "has no label file")
    label = read_label(case.label, max_voxels)
    extras = _png_masks(case.image) if file_suffix(case.label) == ".png" else []
    for extra in (p for p in extras if p != case.label):
        more = read_label(extra, max_voxels)
        if more.shape != label.shape:
            raise data_error(extra, f"mask shape {more.shape} differs from {case.label.name} {label.shape}")
        label = np.maximum(label, more)
    return label
