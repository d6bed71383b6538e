"""Reading and writing single image files (NIfTI and PNG).

Every failure raises DataError with a one-line message ``"<full path>: <what is wrong>"``.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from amlp_core.errors import DataError
from amlp_core.reading import file_kind

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_CHANNELS = 4
_UNREADABLE = "cannot read as {}: file is truncated, corrupt or not an image ({}: {})"


def file_suffix(path: str | os.PathLike) -> str:
    """Lower-case suffix of ``path``, with ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def strip_suffix(path: str | os.PathLike) -> str:
    """File name of ``path`` without its (possibly double) suffix."""
    name = Path(path).name
    return name[: len(name) - len(file_suffix(name))]


def data_error(path: str | os.PathLike, what: str) -> DataError:
    """DataError with the one-line message ``"<path>: <what>"``."""
    return DataError(f"{path}: {' '.join(str(what).split())}")


def _check_readable(path: Path) -> str:
    """The suffix of an existing file of a supported type."""
    if not path.is_file():  # (a FIFO or a device would block the read, or never end)
        raise data_error(path, "file does not exist" if not path.exists() else f"is {file_kind(path.stat().st_mode)}")
    suffix = file_suffix(path)
    if suffix not in (*NIFTI_SUFFIXES, ".png"):
        raise data_error(path, f"unsupported file type {suffix!r}; expected .nii, .nii.gz or .png")
    return suffix


def _check_size(path: Path, shape: tuple[int, ...], max_voxels: int | None) -> None:
    """Refuse a file whose header declares more than ``max_voxels`` values, before anything is read."""
    declared = math.prod(int(n) for n in shape)
    if max_voxels is not None and declared > max_voxels:
        raise data_error(
            path, f"header declares {declared:,} voxels {tuple(shape)}, above the limit data.max_voxels={max_voxels:,}"
        )


def _load_nifti(path: Path, max_voxels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (fully read, scaling applied) and the (4, 4) affine of a NIfTI file."""
    try:
        img: Any = nib.load(str(path), mmap=False)  # a Nifti1/2Image (nibabel types it as any file image)
    except Exception as exc:  # nibabel, gzip and numpy raise many different types
        raise data_error(path, _UNREADABLE.format("NIfTI", type(exc).__name__, exc)) from exc
    _check_size(path, img.shape, max_voxels)  # the header only: nothing is decompressed yet
    try:
        data = np.asarray(img.dataobj)  # reads the whole file, so truncated .gz files fail here
    except Exception as exc:
        raise data_error(path, _UNREADABLE.format("NIfTI", type(exc).__name__, exc)) from exc
    if data.size == 0 or not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise data_error(path, f"no numeric voxels (shape {data.shape}, type {data.dtype})")
    if np.iscomplexobj(data):  # (casting would drop the imaginary part with only numpy's warning)
        raise data_error(path, f"complex-valued voxels ({data.dtype}): save the magnitude image as real values")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise data_error(
            path, "the header's voxel-to-world geometry is not finite (NaN or Inf in pixdim or the affine)"
        )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise data_error(path, "the header's voxel-to-world geometry is singular (a voxel size of 0)")
    return data, affine


def _load_png(path: Path, max_voxels: int | None) -> np.ndarray:
    """Pixels ``[H, W]``; colour images are converted to grayscale."""
    try:
        with Image.open(path) as img:
            _check_size(path, img.size, max_voxels)
            img.load()
            return np.asarray(img if img.mode in ("L", "I", "I;16", "F", "1") else img.convert("L"))
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise data_error(path, _UNREADABLE.format("PNG", type(exc).__name__, exc)) from exc


def read_image(path: str | os.PathLike, max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a .nii, .nii.gz or .png image; one whose header declares more than ``max_voxels`` values
    (all channels) is refused before it is decompressed.

    Returns:
        ``(image, affine)``: image float32 ``[C, *spatial]`` (C=1 for grayscale; a 4D NIfTI
        ``[X, Y, Z, C]`` becomes ``[C, X, Y, Z]``), affine float64 ``(4, 4)`` (identity for PNG).

    Raises:
        DataError: missing, unreadable, truncated or unsupported file, or NaN/Inf values.
    """
    path = Path(path)
    if _check_readable(path) == ".png":
        data, affine = _load_png(path, max_voxels), np.eye(4)
    else:
        data, affine = _load_nifti(path, max_voxels)
    if data.ndim == 4 and data.shape[3] <= MAX_CHANNELS:
        data = np.moveaxis(data, 3, 0)
    elif data.ndim <= 3:
        data = data[None]
    else:
        raise data_error(path, f"shape {data.shape} is not 2D/3D with at most {MAX_CHANNELS} channels")
    image = np.ascontiguousarray(data, dtype=np.float32)
    if not np.isfinite(image).all():
        raise data_error(path, f"image has {int((~np.isfinite(image)).sum())} NaN/Inf voxels")
    return image, affine


#: The largest value a label map may hold (classes are numbered 0 to K-1, and K is at most 256).
MAX_LABEL_VALUE = 255


def read_label(path: str | os.PathLike, max_voxels: int | None = None) -> np.ndarray:
    """Read a label map as int64 ``[*spatial]``; in PNG masks every nonzero pixel becomes 1. A header
    that declares more than ``max_voxels`` values is refused before anything is decompressed.

    Raises:
        DataError: unreadable file, more than 3 dimensions, or non-integer values.
    """
    path = Path(path)
    if _check_readable(path) == ".png":
        return _png_mask(path, max_voxels)
    data, _ = _load_nifti(path, max_voxels)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise data_error(path, f"label map has shape {data.shape}; expected 2D or 3D")
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
        raise data_error(path, "label map has non-integer (or NaN/Inf) values")
    low, high = data.min().item(), data.max().item()  # (Python numbers: a uint64 2**64-1 stays itself)
    if low < 0 or high > MAX_LABEL_VALUE:
        odd = low if low < 0 else high
        raise data_error(path, f"label value {odd} is not a class number (0 to {MAX_LABEL_VALUE})")
    return data.astype(np.int64)


#: The pixel values a PNG mask may hold: 0 and 255 (or 0 and 1; a bilevel PNG reads as False/True).
MASK_VALUES = (frozenset({0, 255}), frozenset({0, 1}))


def _png_mask(path: Path, max_voxels: int | None) -> np.ndarray:
    """A PNG mask as int64 ``[H, W]`` of 0 and 1: every value must be 0 or 255 (or 0 and 1), so that a
    grey or anti-aliased mask, whose lesion border nobody drew, is refused rather than thresholded."""
    raw = _load_png(path, max_voxels)
    values = frozenset(int(v) for v in np.unique(raw))
    if not any(values <= allowed for allowed in MASK_VALUES):
        other = sorted(values - {0, 255})
        shown = ", ".join(map(str, other[:5])) + (", ..." if len(other) > 5 else "")
        raise data_error(path, f"mask holds values other than 0 and 255 ({shown}): a mask must be black and white")
    return (raw != 0).astype(np.int64)


def label_affine(path: str | os.PathLike) -> np.ndarray:
    """The (4, 4) affine in the header of a label file (identity for PNG), without reading its voxels."""
    path = Path(path)
    if _check_readable(path) == ".png":
        return np.eye(4)
    try:
        return np.asarray(nib.load(str(path)).affine, dtype=np.float64)  # type: ignore[attr-defined]
    except Exception as exc:
        raise data_error(path, _UNREADABLE.format("NIfTI", type(exc).__name__, exc)) from exc


def _nifti_array(array: np.ndarray) -> np.ndarray:
    """NIfTI-friendly dtype: bool/64-bit integers -> uint8 or int32, float64 -> float32."""
    if array.dtype == bool or (np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize == 8):
        fits_uint8 = array.size == 0 or (array.min() >= 0 and array.max() <= 255)
        return array.astype(np.uint8 if fits_uint8 else np.int32)
    return array.astype(np.float32) if array.dtype == np.float64 else array


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write ``array`` ``[*spatial]`` with ``affine`` ``(4, 4)`` to a .nii or .nii.gz ``path``.

    Writes a temporary file in the same folder, then renames it over ``path``, so an
    interrupted write never replaces a good file.
    """
    path = Path(path)
    if file_suffix(path) not in NIFTI_SUFFIXES:
        raise data_error(path, "write_nifti needs a .nii or .nii.gz file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(_nifti_array(np.asarray(array)), np.asarray(affine, dtype=np.float64))
    tmp = path.with_name(f".{uuid.uuid4().hex}.{path.name}")  # same folder and suffix
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("wrote %s", path)


def mask_pixels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A label map ``[H, W]`` as the pixels of a mask PNG (uint8): 0 and 255 for two classes, as BUSI's
    masks are; the class numbers themselves for more."""
    labels = np.asarray(labels)
    return (labels > 0).astype(np.uint8) * 255 if num_classes <= 2 else labels.astype(np.uint8)


#: Overlay colours of classes 1, 2, ... (RGB), drawn at :data:`OVERLAY_ALPHA` over the grey image.
OVERLAY_COLOURS = ((230, 40, 40), (40, 200, 60), (50, 110, 240), (240, 200, 30))
OVERLAY_ALPHA = 0.4


def overlay_pixels(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image ``[C, H, W]`` (its first channel, stretched to 0..255) as RGB uint8 ``[H, W, 3]`` with each
    class of ``labels`` ``[H, W]`` tinted in its colour and its border drawn solid."""
    grey = np.asarray(image[0], dtype=np.float64)
    low, high = np.percentile(grey, (0.5, 99.5))
    grey = np.clip((grey - low) / max(high - low, 1e-6), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for k in range(1, int(labels.max(initial=0)) + 1):
        inside = labels == k
        if not inside.any():
            continue
        colour = np.asarray(OVERLAY_COLOURS[(k - 1) % len(OVERLAY_COLOURS)], dtype=np.float64)
        rgb[inside] = (1 - OVERLAY_ALPHA) * rgb[inside] + OVERLAY_ALPHA * colour
        rgb[inside & ~ndimage.binary_erosion(inside)] = colour
    return rgb.round().astype(np.uint8)


def quicklook_pixels(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A quick look at a segmented case: a 2D image ``[C, H, W]`` with its labels over it
    (:func:`overlay_pixels`), or for a volume ``[C, X, Y, Z]`` three orthogonal slices through the centre of
    the labels (the volume's centre without any), side by side on one black strip. RGB uint8 ``[H, W, 3]``."""
    if image.ndim == 3:
        return overlay_pixels(image, labels)
    found = np.argwhere(labels > 0)
    centre = found.mean(0).round().astype(int) if len(found) else np.asarray(labels.shape) // 2
    views = [
        overlay_pixels(np.take(image, int(centre[axis]), axis=axis + 1), np.take(labels, int(centre[axis]), axis=axis))
        for axis in range(3)
    ]
    height = max(v.shape[0] for v in views)
    padded = [np.pad(v, ((0, height - v.shape[0]), (0, 0), (0, 0))) for v in views]
    return np.concatenate(padded, axis=1)


def write_png(pixels: np.ndarray, path: str | os.PathLike) -> Path:
    """Write uint8 ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB) pixels to ``path`` atomically (a temporary file
    in the same folder, then renamed over it)."""
    from amlp_core.atomic import atomic_write

    path = Path(path)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    return atomic_write(path, lambda f: image.save(f, format="PNG"))
