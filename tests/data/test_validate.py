import json

import numpy as np
import pytest

from amlp_core.data import check_dataset

from .helpers import label_map, save_nii, truncate, volume


def test_good_folder_is_ok(msd_root):
    report = check_dataset(msd_root)
    assert report.ok and report.problems == [] and report.fmt == "msd"
    assert report.n_cases == 3 and report.n_labelled == 3
    text = report.render()
    assert str(msd_root) in text.splitlines()[0] and "3 cases" in text
    assert text.splitlines()[-1].startswith("OK")
    assert report.to_dict()["ok"] is True and report.to_dict()["n_cases"] == 3


def test_limit(msd_root):
    assert check_dataset(msd_root, limit=2).n_cases == 2


def _truncated(root):
    return truncate(root / "imagesTr" / "case_001.nii.gz"), "truncated"


def _text_file(root):
    path = root / "labelsTr" / "case_001.nii.gz"
    path.write_text("not an image")
    return path, "not an image"


def _two_d(root):
    return save_nii(root / "imagesTr" / "case_001.nii.gz", volume()[:, :, 0]), "spatial dims"


def _shape_mismatch(root):
    return save_nii(root / "labelsTr" / "case_001.nii.gz", label_map(shape=(8, 10, 5))), "does not match"


def _label_five(root):
    label = label_map()
    label[0, 0, 0] = 5
    return save_nii(root / "labelsTr" / "case_001.nii.gz", label), "[5]"


def _nan(root):
    image = volume()
    image[2, 2, 2] = np.nan
    return save_nii(root / "imagesTr" / "case_001.nii.gz", image), "NaN"


@pytest.mark.parametrize("spoil", [_truncated, _text_file, _two_d, _shape_mismatch, _label_five, _nan])
def test_problem_names_file(msd_root, spoil):
    bad_file, words = spoil(msd_root)
    report = check_dataset(msd_root)
    assert not report.ok and report.n_cases == 3
    assert [p.file for p in report.errors] == [str(bad_file)]
    assert words in report.errors[0].message
    assert f"ERROR {bad_file}: " in report.render()
    assert report.render().splitlines()[-1].startswith("NOT USABLE: 1 errors")


def test_empty_folder_is_one_error(tmp_path):
    report = check_dataset(tmp_path)
    assert not report.ok and report.n_cases == 0
    assert report.errors[0].file == str(tmp_path) and "empty" in report.errors[0].message


def test_every_problem_is_reported_not_the_first(msd_root):
    missing = [msd_root / "labelsTr" / f"case_00{i}.nii.gz" for i in (0, 2)]
    for path in missing:
        path.unlink()
    bad_image = truncate(msd_root / "imagesTr" / "case_001.nii.gz")
    report = check_dataset(msd_root)
    assert sorted(p.file for p in report.errors) == sorted(map(str, [*missing, bad_image]))
    assert "NOT USABLE: 3 errors" in report.render()


def test_label_geometry_must_match_its_image(msd_root):
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    path = save_nii(msd_root / "labelsTr" / "case_001.nii.gz", label_map(1), affine=shifted)
    report = check_dataset(msd_root)
    assert [p.file for p in report.errors] == [str(path)] and "affine" in report.errors[0].message
    tiny = np.eye(4)
    tiny[0, 3] = 1e-5  # float rounding of a header, not another geometry
    save_nii(msd_root / "labelsTr" / "case_001.nii.gz", label_map(1), affine=tiny)
    assert check_dataset(msd_root).ok


def test_channels_must_agree_across_cases(msd_root):
    two = np.stack([volume(1), volume(2)], axis=-1)
    path = save_nii(msd_root / "imagesTr" / "case_001.nii.gz", two)
    report = check_dataset(msd_root)
    assert [p.file for p in report.errors] == [str(path)] and "most cases have 1" in report.errors[0].message


def test_voxel_limit_refuses_before_decompressing(tmp_path):
    import nibabel as nib

    header = nib.Nifti1Header()  # a small file whose header declares 1000^3 voxels
    header.set_data_shape((1000, 1000, 1000))
    header.set_data_dtype(np.float32)
    bomb = tmp_path / "images" / "bomb.nii"
    bomb.parent.mkdir()
    with open(bomb, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 4096)
    report = check_dataset(tmp_path, max_voxels=10**6)
    assert [p.file for p in report.errors] == [str(bomb)]
    assert "declares 1,000,000,000 voxels" in report.errors[0].message


def test_num_classes_for_plain_nifti(tmp_path):
    save_nii(tmp_path / "images" / "a.nii.gz", volume())
    save_nii(tmp_path / "labels" / "a.nii.gz", label_map(n_classes=3))
    assert check_dataset(tmp_path, num_classes=3).ok
    report = check_dataset(tmp_path, num_classes=2)
    assert not report.ok and report.errors[0].file == str(tmp_path / "labels" / "a.nii.gz")


def test_msd_classes_come_from_dataset_json(msd_root):
    meta = json.loads((msd_root / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "a"}
    (msd_root / "dataset.json").write_text(json.dumps(meta))
    assert len(check_dataset(msd_root, num_classes=3).errors) == 3
