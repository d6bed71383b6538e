"""Finding the image/label pairs of a dataset folder.

Layouts: ``msd`` (a Medical Segmentation Decathlon ``dataset.json``), ``nifti`` (a folder of
NIfTI images, labels in ``root/images`` + ``root/labels`` or in a ``label_dir`` with the same
file names), ``png`` (BUSI: ``x.png`` with ``x_mask.png`` and extra ``x_mask_1.png``, ...) and
``dicom`` (one DICOM image series per folder, anywhere under ``root``; labels are DICOM SEG files
anywhere under ``root`` or NIfTI files ``root/labels/<case name, "/" as "_">.nii.gz``).

:mod:`amlp_core.data.dicom` imports this module (for :class:`Problem`), so it is imported here inside
the functions that need it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from amlp_core.config import DATA_FORMATS
from amlp_core.data.io import NIFTI_SUFFIXES, data_error, file_suffix, read_image, read_label, strip_suffix
from amlp_core.errors import DataError
from amlp_core.reading import read_text

if TYPE_CHECKING:
    from amlp_core.data.dicom import Series

logger = logging.getLogger(__name__)

FORMATS = DATA_FORMATS
_DICOM_PROBES = 64  # files whose first bytes fmt="auto" reads to recognise a DICOM folder (at most 4 per folder)
_MASK_STEM = re.compile(r"^(?P<image>.+)_mask(?:_\d+)?$")


@dataclass(frozen=True)
class Case:
    """One image file and its optional label file.

    A DICOM case has ``series`` (its SeriesInstanceUID); its ``image`` is the series' folder and its
    ``label`` a DICOM SEG or NIfTI file.
    """

    name: str
    image: Path
    label: Path | None
    series: str | None = None
    # The class sub-folder a PNG image is filed in (BUSI's benign/malignant/normal): case metadata that
    # a site may stratify its split by; it leaves the site only as counts. None: the image is in the root.
    category: str | None = None
    extra_labels: tuple[Path, ...] = ()  # further masks of the same image (x_mask_1.png, ...), joined by union


@dataclass
class Sample:
    """One image held in memory."""

    name: str
    image: np.ndarray  # float32 [C, *spatial] (normalised once loaded for training)
    label: np.ndarray | None  # int64 [*spatial]
    affine: np.ndarray  # float64 (4, 4)
    # The near-duplicate group the case belongs to (amlp_core/data/duplicates.py): the name of the group's
    # first case; "" for a case that has no near-duplicate (its own group). Splits keep a group together.
    group: str = ""
    category: str | None = None  # as the case's (Case.category)

    @property
    def group_key(self) -> str:
        """The key that keeps near-duplicates together: the group's name, else the case's own."""
        return self.group or self.name


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    file: str
    message: str
    severity: str = "error"  # "error" | "warning"


@dataclass(frozen=True)
class DatasetIndex:
    """The cases of one dataset folder, sorted by name, and the entries that are not usable cases
    (a listed file that is missing, a duplicate, a path outside the folder, a DICOM series with an error).
    ``series``: the checked DICOM series of a ``dicom`` dataset (one per case), sorted by folder.
    ``modality``: as the dataset names it (dataset.json's first ``modality``, the series' most common
    Modality), ``"unknown"`` when it does not say."""

    root: Path
    fmt: str
    cases: tuple[Case, ...]
    class_names: dict[int, str] | None
    spatial_dims: int
    problems: tuple[Problem, ...] = ()
    series: tuple[Series, ...] = ()
    modality: str = "unknown"


def discover(root: str | os.PathLike, fmt: str = "auto", label_dir: str | os.PathLike | None = None) -> DatasetIndex:
    """List the cases of the dataset in ``root``.

    ``fmt="auto"`` picks msd when ``dataset.json`` exists, else png when any .png file exists, else
    nifti when a NIfTI file lies in ``root`` or ``root/images``, else dicom when a file under ``root``
    starts like a DICOM file, else nifti. ``label_dir`` is for nifti folders with the images directly
    in ``root``.

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
    class_names, spatial_dims, problems, modality = None, 3, list[Problem](), "unknown"
    series: tuple[Series, ...] = ()
    if fmt == "msd":
        cases, problems, class_names, spatial_dims = _discover_msd(root)
        modality = _msd_modality(root / "dataset.json")
    elif fmt == "png":
        cases, class_names, spatial_dims = _discover_png(root), {0: "background", 1: "lesion"}, 2
    elif fmt == "dicom":
        cases, problems, class_names, series = _discover_dicom(root)
        modality = _most_common([s.modality for s in series], root)
    else:
        cases, problems = _discover_nifti(root, None if label_dir is None else Path(label_dir))
    if not cases and not problems:
        raise data_error(root, f"no {fmt} images found")
    n_labelled = sum(c.label is not None for c in cases)
    logger.info("%s: %d %s cases, %d labelled, %d bad entries", root, len(cases), fmt, n_labelled, len(problems))
    ordered = tuple(sorted(cases, key=lambda c: c.name))
    return DatasetIndex(root, fmt, ordered, class_names, spatial_dims, tuple(problems), series, modality)


def _msd_modality(meta_path: Path) -> str:
    """The first channel's ``modality`` of a dataset.json that :func:`_discover_msd` has read."""
    modality = json.loads(read_text(meta_path, "dataset index")).get("modality")
    if isinstance(modality, dict) and modality:
        return str(next(iter(modality.values())))
    return str(modality) if isinstance(modality, str) and modality else "unknown"


def _most_common(modalities: list[str], root: Path) -> str:
    counts = Counter(m for m in modalities if m)
    if len(counts) > 1:
        logger.warning("%s: series of several modalities (%s)", root, ", ".join(sorted(counts)))
    return counts.most_common(1)[0][0] if counts else "unknown"


def _detect_format(root: Path) -> str:
    if (root / "dataset.json").exists():  # (not a regular file: its reader says so, naming it)
        return "msd"
    if next(root.rglob("*.png"), None) is not None:
        return "png"
    folders = [root] + ([root / "images"] if (root / "images").is_dir() else [])
    if any(file_suffix(p) in NIFTI_SUFFIXES for folder in folders for p in folder.iterdir()):
        return "nifti"
    return "dicom" if _holds_dicom(root) else "nifti"


def _holds_dicom(root: Path) -> bool:
    """Whether one of the first few files of ``root``'s folders (a few per folder) starts like a DICOM file."""
    from amlp_core.data.dicom import looks_like_dicom

    probed = 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith("."))[:4]:
            if looks_like_dicom(Path(folder) / name):
                return True
            probed += 1
            if probed >= _DICOM_PROBES:
                return False
    return False


def _discover_msd(root: Path) -> tuple[list[Case], list[Problem], dict[int, str] | None, int]:
    """Cases, bad entries, class names and spatial dims from ``root/dataset.json``."""
    meta_path = root / "dataset.json"
    text = read_text(meta_path, "dataset index")  # a regular file of bounded size: never a FIFO
    try:
        meta = json.loads(text)
        entries = list(meta["training"])
        class_names = {int(k): str(v) for k, v in meta["labels"].items()} if "labels" in meta else None
    except RecursionError:
        raise data_error(meta_path, "not a valid MSD dataset.json (nested too deeply)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise data_error(meta_path, f"not a valid MSD dataset.json ({type(exc).__name__}: {exc})") from exc
    if class_names is not None and sorted(class_names) != list(range(len(class_names))):
        keys = ", ".join(str(k) for k in sorted(class_names))
        raise data_error(
            meta_path,
            f"its labels are {{{keys}}}: the classes must be numbered 0 to K-1 with 0 the background "
            "(a label map of other values cannot be trained: renumber the labels and their files)",
        )
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


def _discover_dicom(root: Path) -> tuple[list[Case], list[Problem], dict[int, str] | None, tuple[Series, ...]]:
    """One case per checked series under ``root``; its label is a SEG referencing it, else a NIfTI file
    ``root/labels/<name>.nii.gz`` (or ``.nii``). Class names are the SEG files' segment labels."""
    from amlp_core.data.dicom import find_series, seg_classes

    found, segs, problems = find_series(root)
    usable = {s.uid for s in found}
    class_names: dict[int, str] = {}
    for uid, seg in sorted(segs.items(), key=lambda item: item[1]):
        if uid not in usable:
            problems.append(
                Problem(str(seg), f"references the series {uid}, which is not a usable series here", "warning")
            )
            continue
        try:
            for number, name in seg_classes(seg).items():
                class_names.setdefault(number, name)
        except DataError as exc:
            problems.append(Problem(str(seg), str(exc).removeprefix(f"{seg}: ")))
            segs.pop(uid)
    cases = []
    for series in found:
        name = root.name if series.folder == root else series.folder.relative_to(root).as_posix()
        label = segs.get(series.uid)
        if label is None:
            stem = root / "labels" / name.replace("/", "_")
            label = next((p for p in (Path(f"{stem}.nii.gz"), Path(f"{stem}.nii")) if p.is_file()), None)
        cases.append(Case(name, series.folder, label, series.uid))
    names = ({0: "background"} | dict(sorted(class_names.items()))) if class_names else None
    return cases, problems, names, tuple(found)


def _discover_png(root: Path) -> list[Case]:
    """Every ``x.png`` under ``root`` that is not a mask; its label is its first mask (``x_mask.png``),
    its further masks (``x_mask_1.png``, ...) are joined to it; its category is its sub-folder's name."""
    pngs = sorted(p for p in root.rglob("*.png") if not p.name.startswith("."))
    masks: dict[Path, list[Path]] = {}
    for path in pngs:  # sorted: x_mask.png comes before x_mask_1.png
        if match := _MASK_STEM.match(path.stem):
            masks.setdefault(path.with_stem(match["image"]), []).append(path)
    return [
        Case(
            image.relative_to(root).with_suffix("").as_posix(),
            image,
            masks[image][0] if image in masks else None,
            category=image.parent.name if image.parent != root else None,
            extra_labels=tuple(masks.get(image, [])[1:]),
        )
        for image in pngs
        if not _MASK_STEM.match(image.stem)
    ]


def label_is_seg(case: Case) -> bool:
    """Whether the label of ``case`` is a DICOM SEG (on its series' grid, with the series' affine)."""
    return case.series is not None and case.label is not None and file_suffix(case.label) not in NIFTI_SUFFIXES


def read_case_image(case: Case, max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image of ``case``: its DICOM series (re-reading only the series folder's headers) or its image file.

    Returns:
        ``(image, affine)``: float32 ``[C, *spatial]`` and float64 ``(4, 4)`` (RAS+ for NIfTI and DICOM).

    Raises:
        DataError: as :func:`~amlp_core.data.io.read_image` or :func:`~amlp_core.data.dicom.read_series`.
    """
    if case.series is None:
        return read_image(case.image, max_voxels)
    from amlp_core.data.dicom import read_series, series_of

    return read_series(series_of(case), max_voxels)


def read_case_label(case: Case, max_voxels: int | None = None) -> np.ndarray:
    """Label map of ``case`` as int64 ``[*spatial]``; several PNG masks are merged (union); a DICOM SEG
    is read on its series' grid.

    Raises:
        DataError: the case has no label, or a mask is unreadable, too large or of another shape.
    """
    if case.label is None:
        raise data_error(case.image, "has no label file")
    if label_is_seg(case):
        from amlp_core.data.dicom import read_seg, series_of

        return read_seg(case.label, series_of(case), max_voxels)
    label = read_label(case.label, max_voxels)
    for extra in case.extra_labels:
        more = read_label(extra, max_voxels)
        if more.shape != label.shape:
            raise data_error(extra, f"mask shape {more.shape} differs from {case.label.name} {label.shape}")
        label = np.maximum(label, more)
    return label
