"""DICOM image series (one single-frame file per slice) and DICOM SEG label maps.

Voxel arrays follow nibabel/ITK: index ``[i, j, k]`` = (column, row, slice), i.e. each slice is
``pixel_array.T``, slices stacked on the last axis in ascending position along the slice normal. The
(4, 4) affine maps ``(i, j, k, 1)`` to world millimetres in RAS+ (the NIfTI convention): it is built in
DICOM's LPS from ImageOrientationPatient, PixelSpacing and ImagePositionPatient, then flipped with
``diag(-1, -1, 1, 1)``.

:func:`find_series` walks a folder and checks every series (missing or duplicate slices, uneven
spacing, mixed series in one folder, ...); only series without errors are returned, so that every
:class:`Series` can be read as one regular grid. Every failure raises DataError with a one-line message
``"<path>: <what is wrong>"``.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import uuid
import warnings
from collections import defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale

from amlp_core.data.cases import Problem
from amlp_core.data.io import data_error, file_suffix
from amlp_core.reading import file_kind

if TYPE_CHECKING:
    from amlp_core.data.cases import Case

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
_DEFER = 1024  # header reads: values above this many bytes (pixel data) are skipped, not loaded
_SAME_MM = 0.01  # two slices closer than this along the normal share a position
_GAP = 1.5  # a step above this many median steps is a gap (missing slices)
_UNEVEN = 0.01  # a step off the median by more than this fraction is uneven
_UNIT_TOLERANCE = 1e-3  # ImageOrientationPatient: unit lengths and a zero dot product to within this
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_REQUIRED = ("SOPInstanceUID", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
# Patient and study attributes that highdicom copies from the source images into a SEG; all are type 2
# (may be empty) but some exports leave them out.
_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName",
)  # fmt: skip


@dataclass(frozen=True, eq=False)  # eq=False: compared and hashed by identity (it holds an array)
class Series:
    """One checked DICOM image series: a regular grid of single-frame slices in one folder."""

    uid: str  # SeriesInstanceUID
    folder: Path
    files: tuple[Path, ...]  # sorted by position along the slice normal, ascending
    modality: str  # "MR", "CT", ...
    description: str  # SeriesDescription or ""
    shape: tuple[int, int, int]  # (columns, rows, slices)
    spacing: tuple[float, float, float]  # mm: column step, row step, slice step
    affine: np.ndarray  # float64 (4, 4), voxel (i, j, k) -> RAS+ mm
    instance_uids: tuple[str, ...] = ()  # SOPInstanceUID of each file, in the order of ``files``


@dataclass
class _Slice:
    """The header values of one image file that the checks need."""

    path: Path
    sop_uid: str | None
    modality: str
    description: str
    has_pixels: bool
    frames: int
    samples: int
    rows: int | None
    cols: int | None
    position: np.ndarray | None  # (3,) LPS mm
    orientation: np.ndarray | None  # (6,) direction cosines: along a row (increasing column), along a column
    pixel_spacing: np.ndarray | None  # (2,) mm: row spacing (step along j), column spacing (step along i)
    thickness: float | None


def _numbers(ds: Any, name: str, n: int) -> np.ndarray | None:
    """The ``n`` numbers of a multi-valued attribute, or None when it is absent, short or not numeric."""
    try:
        values = np.asarray([float(v) for v in ds.get(name)], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return values if values.shape == (n,) and np.isfinite(values).all() else None


def _number(ds: Any, name: str) -> float | None:
    try:
        value = float(ds.get(name))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _header(path: Path, ds: Any) -> _Slice:
    rows, cols = _number(ds, "Rows"), _number(ds, "Columns")
    return _Slice(
        path=path,
        sop_uid=str(ds.SOPInstanceUID) if ds.get("SOPInstanceUID") else None,
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "") or ""),
        has_pixels=any(tag in ds for tag in _PIXEL_TAGS),
        frames=int(_number(ds, "NumberOfFrames") or 1),
        samples=int(_number(ds, "SamplesPerPixel") or 1),
        rows=None if rows is None else int(rows),
        cols=None if cols is None else int(cols),
        position=_numbers(ds, "ImagePositionPatient", 3),
        orientation=_numbers(ds, "ImageOrientationPatient", 6),
        pixel_spacing=_numbers(ds, "PixelSpacing", 2),
        thickness=_number(ds, "SliceThickness"),
    )


def _files(root: Path, recursive: bool) -> list[Path]:
    """Non-hidden entries under ``root`` that are not folders (not in hidden folders), sorted: regular files,
    and the special ones (FIFOs, devices, sockets), which :func:`find_series` names without opening."""
    if not recursive:
        return sorted(p for p in root.iterdir() if not p.is_dir() and not p.name.startswith("."))
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / n for n in names if not n.startswith(".")]
    return sorted(found)


#: Files a series folder may hold beside its slices without a word (notes, exports, labels).
OTHER_SUFFIXES = frozenset(
    {".md", ".txt", ".json", ".nii", ".gz", ".png", ".jpg", ".jpeg", ".csv", ".xml", ".pdf", ".html", ".yaml", ".yml"}
)


def _read_header(path: Path) -> Any:
    """The DICOM header of ``path`` (pixels deferred); a file without the 128-byte preamble and ``DICM``
    magic is read too when it parses as DICOM and names its series (older writers omit the preamble).

    Raises:
        InvalidDicomError: not DICOM. Anything else pydicom raises: a damaged file.
    """
    try:
        return pydicom.dcmread(path, defer_size=_DEFER)
    except InvalidDicomError:
        if file_suffix(path) in OTHER_SUFFIXES:  # (notes and exports are not parsed as DICOM)
            raise
        try:
            with warnings.catch_warnings():  # (pydicom warns at every guess it makes about a foreign file)
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, defer_size=_DEFER, force=True)
        except Exception:
            raise InvalidDicomError(f"{path} is not DICOM") from None
        if ds.get("SeriesInstanceUID") and ds.get("SOPInstanceUID"):
            return ds
        raise


def looks_like_dicom(path: Path) -> bool:
    """Whether ``path`` starts like a DICOM file (the ``DICM`` magic after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def find_series(root: str | os.PathLike, recursive: bool = True) -> tuple[list[Series], dict[str, Path], list[Problem]]:
    """Find and check the DICOM image series and SEG files under ``root``.

    Every non-hidden file is read up to its pixel data (which is skipped, not loaded); files that are
    not DICOM (no ``DICM`` magic: README.md, NIfTI labels, ...) are ignored, as are objects without
    pixels or Rows (structured reports, RT structure sets, DICOMDIR). Files are grouped by
    SeriesInstanceUID.

    Returns:
        ``(series, segs, problems)``: the series without errors, sorted by folder; the SEG files by the
        SeriesInstanceUID they reference (the first SEG found for a series); and every problem, named
        by the series' folder (or the file). A series with an error is not returned; a single-slice
        series is returned with a warning.
    """
    root = Path(root)
    groups: dict[str, list[_Slice]] = defaultdict(list)
    segs: dict[str, Path] = {}
    problems: list[Problem] = []
    not_dicom: list[Path] = []
    for path in _files(root, recursive):
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):  # opening a FIFO would wait for a writer forever
            problems.append(Problem(str(path), f"is {file_kind(mode)}, not a file; remove it from the data folder"))
            continue
        try:
            ds = _read_header(path)
        except InvalidDicomError:
            not_dicom.append(path)
            continue
        except Exception as exc:  # pydicom raises many types for truncated or corrupt files
            problems.append(Problem(str(path), f"cannot read the DICOM header ({type(exc).__name__}: {exc})"))
            continue
        if str(ds.get("Modality", "")) == "SEG":
            _add_seg(path, ds, segs, problems)
        elif ds.get("SeriesInstanceUID"):
            groups[str(ds.SeriesInstanceUID)].append(_header(path, ds))
        elif any(tag in ds for tag in (*_PIXEL_TAGS, "Rows")):
            problems.append(Problem(str(path), "image file has no SeriesInstanceUID"))
    # Series with no pixels and no Rows in any file are not images (SR, RTSTRUCT, KO, ...).
    images = {uid: s for uid, s in groups.items() if any(x.has_pixels or x.rows is not None for x in s)}
    refused = _mixed_folders(images, problems) | _unreadable_in_series(images, not_dicom, problems)
    found = []
    for uid, slices in sorted(images.items(), key=lambda item: (str(item[1][0].path.parent), item[0])):
        if uid in refused:
            continue
        series, series_problems = _check_series(uid, slices)
        problems += series_problems
        if series is not None:
            found.append(series)
    logger.info("%s: %d usable DICOM series, %d SEG files, %d problems", root, len(found), len(segs), len(problems))
    return found, segs, problems


def _add_seg(path: Path, ds: Any, segs: dict[str, Path], problems: list[Problem]) -> None:
    try:
        uid = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError, KeyError):
        problems.append(Problem(str(path), "DICOM SEG references no series (no ReferencedSeriesSequence)"))
        return
    if uid in segs:
        message = f"a second DICOM SEG of series {uid} (the first is {segs[uid]}); not used"
        problems.append(Problem(str(path), message, "warning"))
        return
    segs[uid] = path


def _unreadable_in_series(images: dict[str, list[_Slice]], not_dicom: list[Path], problems: list[Problem]) -> set[str]:
    """The series refused because a file in their folder does not read as DICOM: a slice cut inside its
    header, or written without its preamble and series, would otherwise leave the series a slice short
    and "OK". Files of :data:`OTHER_SUFFIXES` (notes, exports) are let be."""
    folders: dict[Path, set[str]] = defaultdict(set)
    for uid, slices in images.items():
        for s in slices:
            folders[s.path.parent].add(uid)
    refused: set[str] = set()
    odd = [p for p in not_dicom if p.parent in folders and file_suffix(p) not in OTHER_SUFFIXES]
    for folder in sorted({p.parent for p in odd}):
        files = [p for p in odd if p.parent == folder]
        shown = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
        message = (
            f"{len(files)} file(s) in this series folder do not read as DICOM ({shown}): a damaged slice "
            "would leave the series incomplete; repair or remove them"
        )
        problems.append(Problem(str(folder), message))
        refused |= folders[folder]
    return refused


def _mixed_folders(images: dict[str, list[_Slice]], problems: list[Problem]) -> set[str]:
    """The series refused for sharing a folder with another series or spreading over several folders."""
    by_folder: dict[Path, set[str]] = defaultdict(set)
    for uid, slices in images.items():
        for s in slices:
            by_folder[s.path.parent].add(uid)
    refused: set[str] = set()
    for folder, uids in sorted(by_folder.items()):
        if len(uids) > 1:
            names = ", ".join(sorted(images[u][0].description or u for u in uids))
            message = f"holds files of {len(uids)} image series ({names}); keep one series per folder"
            problems.append(Problem(str(folder), message))
            refused |= uids
    for uid, slices in sorted(images.items()):
        folders = sorted({s.path.parent for s in slices})
        if len(folders) > 1 and uid not in refused:
            listed = ", ".join(str(f) for f in folders[:3])
            message = f"files of series {uid} lie in {len(folders)} folders ({listed}); keep one series per folder"
            problems.append(Problem(str(folders[0]), message))
            refused.add(uid)
    return refused


def _example(slices: list[_Slice]) -> str:
    return f"{len(slices)} file(s), e.g. {slices[0].path.name}"


def _check_series(uid: str, slices: list[_Slice]) -> tuple[Series | None, list[Problem]]:
    """The series of ``slices`` (one folder's files of series ``uid``) and its problems; None on an error."""
    folder = slices[0].path.parent
    where, n = str(folder), len(slices)
    problems = []
    if no_pixels := [s for s in slices if not s.has_pixels]:
        problems.append(Problem(where, f"no pixel data in {_example(no_pixels)} of {n}"))
    if multi := [s for s in slices if s.frames > 1]:
        frames = multi[0].frames
        message = f"multi-frame images are not supported (NumberOfFrames={frames} in {_example(multi)})"
        problems.append(Problem(where, message + "; convert the series to one file per slice"))
    if colour := [s for s in slices if s.samples != 1]:
        message = f"colour images are not supported (SamplesPerPixel={colour[0].samples} in {_example(colour)})"
        problems.append(Problem(where, message))
    for name, attr in zip(_REQUIRED, ("sop_uid", "rows", "cols", "position", "orientation", "pixel_spacing")):
        if lacking := [s for s in slices if getattr(s, attr) is None]:
            problems.append(Problem(where, f"{name} missing or invalid in {_example(lacking)} of {n}"))
    if problems:
        return None, problems
    problems += _geometry_problems(where, slices)
    if problems:
        return None, problems
    for name, attr, atol in (("Rows", "rows", 0), ("Columns", "cols", 0), ("PixelSpacing", "pixel_spacing", 1e-4)):
        problems += _differing(where, slices, name, attr, atol)
    problems += _differing(where, slices, "ImageOrientationPatient", "orientation", 1e-4)
    if problems:
        return None, problems
    first = slices[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    along_row, along_col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(along_row, along_col)
    slices = sorted(slices, key=lambda s: float(np.dot(s.position, normal)))  # type: ignore[arg-type]
    positions = np.stack([s.position for s in slices])  # type: ignore[misc]
    problems = _spacing_problems(where, slices, positions @ normal)
    if not problems and n > 2:
        problems += _line_problems(where, positions, positions @ normal, float(first.pixel_spacing.min()))
    if problems:
        return None, problems
    if n == 1:
        between = float(first.thickness or 1.0)
        problems.append(Problem(where, "a single slice: a 2D image, not a volume", "warning"))
    else:
        between = float(np.dot(positions[-1] - positions[0], normal)) / (n - 1)  # (the slices lie on the normal)
    # highdicom's affine (DICOM PS3.3 C.7.6.2.1.1): index (i, j, k) = (column, row, slice along the normal).
    from highdicom.spatial import create_affine_matrix_from_attributes  # (0.4 s to import: only where DICOM is)

    affine_lps = create_affine_matrix_from_attributes(
        positions[0], first.orientation.tolist(), first.pixel_spacing.tolist(), between, index_convention="RD"
    )
    assert first.cols is not None and first.rows is not None
    series = Series(
        uid=uid,
        folder=folder,
        files=tuple(s.path for s in slices),
        modality=first.modality,
        description=first.description,
        shape=(first.cols, first.rows, n),
        spacing=(float(first.pixel_spacing[1]), float(first.pixel_spacing[0]), between),
        affine=LPS_TO_RAS @ affine_lps,
        instance_uids=tuple(str(s.sop_uid) for s in slices),
    )
    return series, problems


def _geometry_problems(where: str, slices: list[_Slice]) -> list[Problem]:
    """ImageOrientationPatient that is not two orthogonal unit vectors, and spacings that are not positive."""
    problems = []
    for s in slices:
        assert s.orientation is not None and s.pixel_spacing is not None
        row, col = s.orientation[:3], s.orientation[3:]
        norms, dot = (float(np.linalg.norm(row)), float(np.linalg.norm(col))), float(np.dot(row, col))
        if max(abs(n - 1.0) for n in norms) > _UNIT_TOLERANCE or abs(dot) > _UNIT_TOLERANCE:
            values = s.orientation.round(6).tolist()
            message = (
                f"ImageOrientationPatient {values} in {s.path.name} is not two orthogonal unit vectors "
                f"(lengths {norms[0]:.4g} and {norms[1]:.4g}, dot product {dot:.4g})"
            )
            problems.append(Problem(where, message))
            break
    for s in slices:
        assert s.pixel_spacing is not None
        if (s.pixel_spacing <= 0).any():
            values = s.pixel_spacing.tolist()
            problems.append(Problem(where, f"PixelSpacing {values} in {s.path.name} must be positive"))
            break
    if len(slices) == 1 and slices[0].thickness is not None and slices[0].thickness <= 0:
        message = f"SliceThickness {slices[0].thickness} in {slices[0].path.name} must be positive"
        problems.append(Problem(where, message))
    return problems


def _differing(where: str, slices: list[_Slice], name: str, attr: str, atol: float) -> list[Problem]:
    """A problem when the slices' ``attr`` values are not all alike (to ``atol``)."""
    values = [np.atleast_1d(np.asarray(getattr(s, attr), dtype=np.float64)) for s in slices]
    odd = [s for s, v in zip(slices, values) if not np.allclose(v, values[0], rtol=0, atol=atol)]
    if not odd:
        return []
    shown = [getattr(s, attr) for s in (slices[0], odd[0])]
    shown = [v.round(6).tolist() if isinstance(v, np.ndarray) else v for v in shown]
    message = f"slices differ in {name}: {shown[0]} in {slices[0].path.name} but {shown[1]} in {_example(odd)}"
    return [Problem(where, message)]


def _spacing_problems(where: str, slices: list[_Slice], distances: np.ndarray) -> list[Problem]:
    """Duplicate positions, gaps (missing slices) and uneven steps of sorted ``distances`` (mm along the normal)."""
    steps = np.diff(distances)
    if not len(steps):
        return []
    if (same := np.flatnonzero(steps < _SAME_MM)).size:
        k = int(same[0])
        message = (
            f"{same.size} duplicate slice position(s): {slices[k].path.name} and {slices[k + 1].path.name} "
            f"both lie at {distances[k]:.2f} mm along the slice normal"
        )
        return [Problem(where, message)]
    median = float(np.median(steps))
    problems = []
    gaps = np.flatnonzero(steps > _GAP * median)
    if gaps.size:
        missing = [max(1, round(float(steps[k]) / median) - 1) for k in gaps]
        shown = "; ".join(
            f"about {m} between {slices[k].path.name} ({distances[k]:.2f} mm) and {slices[k + 1].path.name} "
            f"({distances[k + 1]:.2f} mm), slices {k + 1} and {k + 2} of {len(slices)}"
            for k, m in zip(gaps[:3].tolist(), missing[:3])
        )
        message = f"missing slices: about {sum(missing)} slice(s) seem missing (the usual step is {median:.4g} mm): "
        problems.append(Problem(where, message + shown))
    in_gap = set(gaps.tolist())
    uneven = [k for k in range(len(steps)) if k not in in_gap and abs(steps[k] - median) > _UNEVEN * median]
    if uneven:
        odd = steps[uneven]
        message = (
            f"uneven slice spacing: {len(uneven)} of {len(steps)} steps differ from the median {median:.4g} mm by "
            f"more than {_UNEVEN:.0%} (from {odd.min():.4g} to {odd.max():.4g} mm, first after {slices[uneven[0]].path.name})"
        )
        problems.append(Problem(where, message))
    return problems


def _line_problems(where: str, positions: np.ndarray, distances: np.ndarray, pixel: float) -> list[Problem]:
    """A problem when the slice origins do not lie on the line from the first to the last (several stacks)."""
    t = (distances - distances[0]) / (distances[-1] - distances[0])
    expected = positions[0] + t[:, None] * (positions[-1] - positions[0])
    off = float(np.linalg.norm(positions - expected, axis=1).max())
    if off <= 0.05 * pixel + 1e-3:
        return []
    return [Problem(where, f"slice positions do not lie on one line (up to {off:.3g} mm off): several stacks?")]


def orientation(affine: np.ndarray) -> str:
    """RAS+ axis codes of ``affine`` (e.g. ``"LPS"``), with ``" oblique"`` when a direction is not axis-aligned."""
    codes = "".join(str(c) for c in nib.orientations.aff2axcodes(affine))
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    oblique = bool((1.0 - np.abs(directions).max(axis=0) > 1e-3).any())
    return codes + (" oblique" if oblique else "")


def describe(series: Series) -> dict:
    """What ``fedamlp data check`` reports of a series (JSON-friendly)."""
    return {
        "folder": str(series.folder),
        "uid": series.uid,
        "modality": series.modality,
        "description": series.description,
        "slices": series.shape[2],
        "shape": list(series.shape),
        "spacing": [round(s, 4) for s in series.spacing],
        "orientation": orientation(series.affine),
    }


def series_of(case: Case) -> Series:
    """The series of a DICOM ``case`` (``case.series`` in the folder ``case.image``), re-reading only that
    folder's headers (not its subfolders); nothing is cached.

    Raises:
        DataError: the folder no longer holds that series, or the series now has an error.
    """
    if case.series is None:
        raise data_error(case.image, "is not a DICOM case (no SeriesInstanceUID)")
    found, _, problems = find_series(case.image, recursive=False)
    for series in found:
        if series.uid == case.series:
            return series
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise data_error(errors[0].file, errors[0].message)
    raise data_error(case.image, f"holds no DICOM series {case.series} any more")


def _check_voxels(series: Series, max_voxels: int | None) -> None:
    declared = math.prod(series.shape)
    if max_voxels is not None and declared > max_voxels:
        raise data_error(
            series.folder,
            f"series declares {declared:,} voxels {series.shape}, above the limit data.max_voxels={max_voxels:,}",
        )


def _read_file(series: Series, path: Path) -> Any:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:
        raise data_error(series.folder, f"cannot read {path.name} ({type(exc).__name__}: {exc})") from exc


def read_series(series: Series, max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read the voxels of ``series`` (modality LUT / rescale slope and intercept applied).

    A series of more than ``max_voxels`` voxels is refused before any pixel is read.

    Returns:
        ``(image, affine)``: image float32 ``[1, X, Y, Z]`` (columns, rows, slices), affine float64 ``(4, 4)``
        in RAS+.

    Raises:
        DataError: naming the folder: too many voxels, a file that cannot be read or decoded or that
        changed since it was found, or NaN/Inf values.
    """
    _check_voxels(series, max_voxels)
    cols, rows, n = series.shape
    volume = np.empty((cols, rows, n), dtype=np.float32)
    for k, path in enumerate(series.files):
        ds = _read_file(series, path)
        if str(ds.get("SeriesInstanceUID", "")) != series.uid or (ds.get("Rows"), ds.get("Columns")) != (rows, cols):
            raise data_error(series.folder, f"{path.name} changed since the series was found; check the data again")
        try:
            pixels = apply_rescale(ds.pixel_array, ds)
        except Exception as exc:  # missing decoder plugin, truncated pixel data, ...
            raise data_error(series.folder, f"cannot decode {path.name} ({type(exc).__name__}: {exc})") from exc
        if pixels.shape != (rows, cols):
            raise data_error(series.folder, f"{path.name} holds pixels of shape {pixels.shape}, not {(rows, cols)}")
        volume[:, :, k] = pixels.T
    if not np.isfinite(volume).all():
        raise data_error(series.folder, f"image has {int((~np.isfinite(volume)).sum())} NaN/Inf voxels")
    return volume[None], series.affine.copy()


def seg_classes(path: str | os.PathLike) -> dict[int, str]:
    """Segment number -> segment label of a DICOM SEG file (its header only).

    Raises:
        DataError: not a readable DICOM SEG.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return {int(item.SegmentNumber): str(item.get("SegmentLabel", "")) for item in ds.SegmentSequence}
    except Exception as exc:
        raise data_error(path, f"cannot read as DICOM SEG ({type(exc).__name__}: {exc})") from exc


def read_seg(path: str | os.PathLike, series: Series, max_voxels: int | None = None) -> np.ndarray:
    """Read the DICOM SEG ``path`` as a label map on the grid of ``series``: segment ``k`` -> value ``k``.

    Where segments overlap, the value is one of them (no overlap check). Slices the SEG leaves out are 0.

    Returns:
        int64 ``[X, Y, Z]`` (the series' shape).

    Raises:
        DataError: naming the SEG file: unreadable, not referencing ``series`` (or instances outside it),
        fractional values, or the series is above ``max_voxels``.
    """
    import highdicom as hd  # heavy import, only where SEGs are read

    path = Path(path)
    _check_voxels(series, max_voxels)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise data_error(path, f"cannot read as DICOM SEG ({type(exc).__name__}: {exc})") from exc
    referenced = {str(item.SeriesInstanceUID): item for item in seg.get("ReferencedSeriesSequence", [])}
    if series.uid not in referenced:
        raise data_error(path, f"does not reference the series {series.uid} of {series.folder}")
    instances = {str(i.ReferencedSOPInstanceUID) for i in referenced[series.uid].get("ReferencedInstanceSequence", [])}
    if outside := instances - set(series.instance_uids):
        raise data_error(path, f"references {len(outside)} instance(s) that are not in the series of {series.folder}")
    try:
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(series.instance_uids),
            combine_segments=True,
            skip_overlap_checks=True,
            assert_missing_frames_are_empty=True,
        )
    except Exception as exc:  # highdicom raises ValueError, RuntimeError, KeyError, ...
        raise data_error(path, f"cannot read its segments ({type(exc).__name__}: {exc})") from exc
    cols, rows, n = series.shape
    if frames.shape != (n, rows, cols):
        raise data_error(path, f"frames of shape {frames.shape[1:]} do not match the series' {(rows, cols)}")
    return np.ascontiguousarray(frames.transpose(2, 1, 0), dtype=np.int64)


def _version() -> str:
    try:
        return metadata.version("fedamlp")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def _source_image(series: Series, path: Path) -> Any:
    """A file of ``series`` with pixels, missing type-2 patient/study attributes added empty (in memory)."""
    ds = _read_file(series, path)
    for name in (n for n in _TYPE2 if n not in ds):
        setattr(ds, name, "")
    return ds


def write_seg(label: np.ndarray, series: Series, class_names: dict[int, str], path: str | os.PathLike) -> Path:
    """Write the label map ``label`` int ``[X, Y, Z]`` (on the grid of ``series``) as a DICOM SEG file.

    One BINARY segment per class value ``1..max(class_names)`` (segment number = class value, label
    from ``class_names``; DICOM needs consecutive numbers, so an unnamed value between is
    ``"class k"``), algorithm type AUTOMATIC ("fedamlp"). Every slice gets a frame, so an
    all-background label is still a valid SEG. Written to a temporary file in the same folder, then
    renamed over ``path``: a failure never replaces a good file.

    Returns:
        ``path``.

    Raises:
        DataError: naming ``path``: wrong shape, values that are not classes, no foreground class, or
        highdicom refuses the source images.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    path = Path(path)
    label = np.asarray(label)
    if label.shape != series.shape:
        raise data_error(path, f"label shape {label.shape} does not match the series {series.shape} of {series.folder}")
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
        if not np.array_equal(label, np.round(label)):
            raise data_error(path, "label map has non-integer (or NaN/Inf) values")
    n_segments = max((int(k) for k in class_names if int(k) > 0), default=0)
    if n_segments == 0:
        raise data_error(path, f"no foreground class in class_names {class_names}")
    values = np.unique(label).astype(np.int64)
    if bad := [int(v) for v in values if v < 0 or v > n_segments]:
        raise data_error(path, f"label values {bad[:10]} are not classes 0..{n_segments}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fedamlp", family=codes.cid7162.ArtificialIntelligence, version=_version()
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=str(class_names.get(k, f"class {k}"))[:64],
            segmented_property_category=codes.SCT.Tissue,  # generic: the label says what it is
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm,
        )
        for k in range(1, n_segments + 1)
    ]
    sources = [_source_image(series, p) for p in series.files]
    frames = np.stack([label[:, :, k].T for k in range(series.shape[2])])  # (slices, rows, columns)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames.astype(np.uint8 if n_segments < 256 else np.uint16),
            segmentation_type="BINARY",
            segment_descriptions=segments,
            series_instance_uid=hd.UID(),
            series_number=900,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="fedamlp",
            manufacturer_model_name="fedamlp",
            software_versions=_version(),
            device_serial_number="0",
            series_description="fedamlp segmentation",
            omit_empty_frames=False,
        )
    except Exception as exc:  # highdicom validates the sources and raises ValueError, AttributeError, ...
        raise data_error(path, f"cannot build a DICOM SEG ({type(exc).__name__}: {exc})") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex}.{path.name}")
    try:
        seg.save_as(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("wrote %s (%d segments on %s)", path, n_segments, series.folder)
    return path
