"""Writers of small real DICOM series for the tests: one single-frame image file per slice.

Geometry is given as a NIfTI-style RAS+ affine (voxel ``[i, j, k]`` = column, row, slice) and
written in DICOM's LPS: ImageOrientationPatient, PixelSpacing and ImagePositionPatient per slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

SOP_CLASSES = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
FRAME_UID = "1.2.826.0.1.3680043.8.498.2"


def oblique_affine(spacing=(0.8, 0.6, 3.0), degrees: float = 15.0, origin=(-20.0, 15.0, 30.0)) -> np.ndarray:
    """RAS+ affine of a grid rotated by ``degrees`` about the first axis then the third, with ``spacing`` (mm)."""
    a = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _ds_text(values: Iterable[float]) -> list[str]:
    """Decimal strings of at most 16 characters (the DS limit), as scanners write them."""
    return [f"{float(v):.10g}"[:16] for v in values]


def write_series(
    folder: Path,
    volume: np.ndarray,
    affine_ras: np.ndarray,
    modality: str = "MR",
    series_uid: str | None = None,
    drop: Iterable[int] = (),
    edit: Callable[[int, Dataset], None] | None = None,
    rescale: tuple[float, float] | None = None,
    description: str = "test series",
    series_number: int = 1,
    prefix: str = "IM",
) -> list[Path]:
    """Write ``volume`` ``[X, Y, Z]`` (int16) as one DICOM file per slice into ``folder``.

    Slice ``k`` is ``volume[:, :, k].T`` (rows = Y, columns = X) at ``affine_ras @ (0, 0, k, 1)``.

    Args:
        drop: slice indices not written (a gap in the positions).
        edit: called as ``edit(k, dataset)`` before slice ``k`` is saved (to break a file on purpose).
        rescale: ``(slope, intercept)`` written as RescaleSlope/RescaleIntercept.
        prefix: start of the file names (two series in one folder need two).

    Returns:
        The written paths in slice order. File names are shuffled so that name order is not slice order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(volume)
    lps = LPS @ np.asarray(affine_ras, dtype=np.float64)
    step_i, step_j = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = [*(lps[:3, 0] / step_i), *(lps[:3, 1] / step_j)]
    series_uid = series_uid or generate_uid()
    n = volume.shape[2]
    names = np.random.default_rng(n).permutation(n)
    dropped = set(drop)
    paths = []
    for k in range(n):
        if k in dropped:
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = modality
        ds.Manufacturer = "tests"
        ds.PatientID = "P001"
        ds.PatientName = "Test^Patient"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = STUDY_UID
        ds.StudyID = "1"
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = FRAME_UID
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = _ds_text(orientation)
        ds.ImagePositionPatient = _ds_text(lps[:3, 3] + k * lps[:3, 2])
        ds.PixelSpacing = _ds_text((step_j, step_i))  # row spacing (along j) first
        ds.SliceThickness = _ds_text([np.linalg.norm(lps[:3, 2])])[0]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = _ds_text(rescale)
            ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype("<i2")).tobytes()
        if edit is not None:
            edit(k, ds)
        path = folder / f"{prefix}{names[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def random_volume(shape=(12, 10, 8), seed: int = 0) -> np.ndarray:
    """A random int16 volume ``[X, Y, Z]`` with no two slices alike."""
    return np.random.default_rng(seed).integers(-500, 2000, size=shape).astype(np.int16)
