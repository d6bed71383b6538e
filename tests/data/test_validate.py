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


def test_missing_label_in_msd_is_reported_not_raised(msd_root):
    (msd_root / "labelsTr" / "case_002.nii.gz").unlink()
    report = check_dataset(msd_root)
    assert not report.ok and "case_002.nii.gz" in report.errors[0].message


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
