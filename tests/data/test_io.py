import os

import nibabel as nib
import numpy as np
import pytest

from amlp_core.data import io as data_io
from amlp_core.data import read_image, read_label, write_nifti
from amlp_core.errors import DataError

from .helpers import save_nii, save_png, truncate, volume


def assert_names(exc_info, path):
    message = str(exc_info.value)
    assert str(path) in message and "\n" not in message


def test_read_nifti_3d(tmp_path):
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    path = save_nii(tmp_path / "a.nii.gz", volume(), affine)
    image, got_affine = read_image(path)
    assert image.shape == (1, 8, 10, 6) and image.dtype == np.float32
    np.testing.assert_allclose(image[0], volume())
    assert got_affine.dtype == np.float64 and np.allclose(got_affine, affine)


def test_read_nifti_4d_channels_first(tmp_path):
    path = save_nii(tmp_path / "a.nii", np.stack([volume(0), volume(1)], axis=-1))
    image, _ = read_image(path)
    assert image.shape == (2, 8, 10, 6)
    np.testing.assert_allclose(image[1], volume(1))


@pytest.mark.parametrize("channels", [None, 3, 4])
def test_read_png_grayscale(tmp_path, channels):
    shape = (12, 9) if channels is None else (12, 9, channels)
    pixels = np.random.default_rng(0).integers(0, 255, size=shape, dtype=np.uint8)
    image, affine = read_image(save_png(tmp_path / "a.png", pixels))
    assert image.shape == (1, 12, 9) and image.dtype == np.float32
    assert np.array_equal(affine, np.eye(4))


def test_read_label_png_binarised(tmp_path):
    mask = np.zeros((5, 6), np.uint8)
    mask[1:3, 2:4] = 255
    label = read_label(save_png(tmp_path / "m.png", mask))
    assert label.dtype == np.int64 and set(np.unique(label)) == {0, 1} and label.sum() == 4


def test_read_label_nifti(tmp_path):
    label = read_label(save_nii(tmp_path / "l.nii.gz", np.arange(6, dtype=np.float32).reshape(1, 2, 3)))
    assert label.dtype == np.int64 and label.shape == (1, 2, 3) and label.max() == 5


def test_read_label_non_integer(tmp_path):
    path = save_nii(tmp_path / "l.nii.gz", np.full((2, 2, 2), 0.5, np.float32))
    with pytest.raises(DataError, match="non-integer") as exc_info:
        read_label(path)
    assert_names(exc_info, path)


def _missing(tmp_path):
    return tmp_path / "nope.nii.gz"


def _truncated_nifti(tmp_path):
    return truncate(save_nii(tmp_path / "t.nii.gz", volume(shape=(20, 20, 20))))


def _truncated_png(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    return truncate(save_png(tmp_path / "t.png", pixels))


def _text_as_nifti(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image\n")
    return path


def _text_as_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    return path


def _unsupported(tmp_path):
    path = tmp_path / "scan.mha"
    path.write_bytes(b"\0" * 10)
    return path


def _nan_voxels(tmp_path):
    data = volume()
    data[1, 2, 3] = np.nan
    return save_nii(tmp_path / "nan.nii.gz", data)


def _inf_voxels(tmp_path):
    data = volume()
    data[0, 0, 0] = np.inf
    return save_nii(tmp_path / "inf.nii", data)


BAD_IMAGES = [_missing, _truncated_nifti, _truncated_png, _text_as_nifti, _text_as_png, _unsupported]
BAD_IMAGES += [_nan_voxels, _inf_voxels]


@pytest.mark.parametrize("make_bad", BAD_IMAGES)
def test_bad_image_names_file(tmp_path, make_bad):
    path = make_bad(tmp_path)
    with pytest.raises(DataError) as exc_info:
        read_image(path)
    assert_names(exc_info, path)


def test_write_nifti_round_trip(tmp_path):
    affine = np.array([[0, -1.5, 0, 10], [2, 0, 0, -5], [0, 0, 3, 1], [0, 0, 0, 1]], dtype=float)
    path = tmp_path / "sub" / "out.nii.gz"
    write_nifti(volume(), affine, path)
    write_nifti(np.ones((3, 4, 5), np.int64), affine, tmp_path / "lab.nii")
    image, got_affine = read_image(path)
    assert image.shape == (1, 8, 10, 6)
    np.testing.assert_allclose(image[0], volume())
    np.testing.assert_allclose(got_affine, affine)
    assert read_label(tmp_path / "lab.nii").shape == (3, 4, 5)
    assert sorted(os.listdir(path.parent)) == ["out.nii.gz"]


def test_write_nifti_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.nii.gz"
    write_nifti(volume(0), np.eye(4), path)
    good = path.read_bytes()

    def crash_midway(image, filename):  # simulates a crash after part of the file was written
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(data_io.nib, "save", crash_midway)
    with pytest.raises(OSError):
        write_nifti(volume(1), np.eye(4), path)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["out.nii.gz"]
    monkeypatch.undo()
    assert nib.load(str(path)).shape == (8, 10, 6)
