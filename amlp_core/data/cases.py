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


@dataclass(frozen=True)
class DatasetIndex:
    """The cases of one dataset folder, sorted by name."""

    root: Path
    fmt: str
    cases: tuple[Case, ...]
    class_names: dict[int, str] | None
    spatial_dims: int


def discover(root: str | os.PathLike, fmt: str = "auto", label_dir: str | os.PathLike | None = None) -> DatasetIndex:
    """List the cases of the dataset in ``root``.

    ``fmt="auto"`` picks msd when ``dataset.json`` exists, else png when any .png file
    exists, else nifti. ``label_dir`` is for nifti folders with the images directly in ``root``.

    Raises:
        DataError: missing or empty folder, unknown format, no images, bad dataset.json,
            or a file listed in dataset.json that does not exist.
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
    class_names, spatial_dims = None, 3
    if fmt == "msd":
        cases, class_names, spatial_dims = _discover_msd(root)
    elif fmt == "png":
        cases, class_names, spatial_dims = _discover_png(root), {0: "background", 1: "lesion"}, 2
    else:
        cases = _discover_nifti(root, None if label_dir is None else Path(label_dir))
    if not cases:
        raise data_error(root, f"no {fmt} images found")
    n_labelled = sum(c.label is not None for c in cases)
    logger.info("%s: %d %s cases, %d labelled", root, len(cases), fmt, n_labelled)
    return DatasetIndex(root, fmt, tuple(sorted(cases, key=lambda c: c.name)), class_names, spatial_dims)


def _detect_format(root: Path) -> str:
    if (root / "dataset.json").is_file():
        return "msd"
    return "png" if next(root.rglob("*.png"), None) is not None else "nifti"


def _discover_msd(root: Path) -> tuple[list[Case], dict[int, str] | None, int]:
    """Cases, class names and spatial dims from ``root/dataset.json``."""
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
        entries = list(meta["training"])
        class_names = {int(k): str(v) for k, v in meta["labels"].items()} if "labels" in meta else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise data_error(meta_path, f"not a valid MSD dataset.json ({type(exc).__name__}: {exc})") from exc
    spatial_dims = 2 if str(meta.get("tensorImageSize", "3D")).upper() == "2D" else 3
    return [_msd_case(root, entry, meta_path) for entry in entries], class_names, spatial_dims


def _msd_case(root: Path, entry: object, meta_path: Path) -> Case:
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise data_error(meta_path, f"training entry {entry!r} has no 'image' path")
    image = root / entry["image"]
    label = root / entry["label"] if isinstance(entry.get("label"), str) else None
    for path in (image, label):
        if path is not None and not path.is_file():
            raise data_error(path, f"file listed in {meta_path} does not exist")
    return Case(strip_suffix(image), image, label)


def _nifti_files(folder: Path) -> dict[str, Path]:
    """Non-hidden NIfTI files directly in ``folder``, by name without suffix."""
    return {
        strip_suffix(p): p
        for p in sorted(folder.iterdir())
        if p.is_file() and file_suffix(p) in NIFTI_SUFFIXES and not p.name.startswith(".")
    }


def _discover_nifti(root: Path, label_dir: Path | None) -> list[Case]:
    image_dir = root
    if (root / "images").is_dir():
        image_dir, label_dir = root / "images", label_dir or root / "labels"
    elif label_dir is not None and not label_dir.is_dir():
        raise data_error(label_dir, "label folder does not exist")
    labels = _nifti_files(label_dir) if label_dir is not None and label_dir.is_dir() else {}
    cases = [Case(name, path, labels.get(name)) for name, path in _nifti_files(image_dir).items()]
    unlabelled = [c.name for c in cases if c.label is None]
    if labels and unlabelled:
        logger.warning(
            "%s: no label file for %d of %d images (e.g. %s); they are used unlabelled",
            label_dir,
            len(unlabelled),
            len(cases),
            unlabelled[0],
        )
    return cases


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


def read_case_label(case: Case) -> np.ndarray:
    """Label map of ``case`` as int64 ``[*spatial]``; several PNG masks are merged (union).

    Raises:
        DataError: the case has no label, or a mask is unreadable or of another shape.
    """
    if case.label is None:
        raise data_error(case.image, "has no label file")
    label = read_label(case.label)
    extras = _png_masks(case.image) if file_suffix(case.label) == ".png" else []
    for extra in (p for p in extras if p != case.label):
        more = read_label(extra)
        if more.shape != label.shape:
            raise data_error(extra, f"mask shape {more.shape} differs from {case.label.name} {label.shape}")
        label = np.maximum(label, more)
    return label
