"""Writers of small real image files for the data tests."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

SHAPE = (8, 10, 6)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_dataset(folder: Path, marker: str, what: str) -> Path:
    """``folder`` (under ../shared/data) when its ``marker`` exists, else skip the test saying ``what`` is absent."""
    import pytest

    if not (folder / marker).exists():
        pytest.skip(f"real data not found at {folder} ({what} lives outside the repo)")
    return folder


def save_nii(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def volume(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 100, size=shape).astype(np.float32)


def label_map(seed: int = 0, shape=SHAPE, n_classes: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_classes, size=shape).astype(np.uint8)


def write_msd(root: Path, n: int = 3, shape=SHAPE) -> Path:
    """MSD folder with ``n`` labelled cases ``case_000..``, labels {0,1,2}."""
    training = []
    for i in range(n):
        save_nii(root / "imagesTr" / f"case_{i:03d}.nii.gz", volume(i, shape))
        save_nii(root / "labelsTr" / f"case_{i:03d}.nii.gz", label_map(i, shape))
        name = f"case_{i:03d}.nii.gz"
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"labels": {"0": "background", "1": "a", "2": "b"}, "training": training[::-1]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
