import json
import logging

import numpy as np
import pytest

from amlp_core.data import discover, load_samples, read_case_label
from amlp_core.errors import DataError

from .helpers import label_map, save_nii, save_png, volume


def test_msd(msd_root):
    index = discover(msd_root)
    assert index.fmt == "msd" and index.spatial_dims == 3
    assert index.class_names == {0: "background", 1: "a", 2: "b"}
    assert [c.name for c in index.cases] == ["case_000", "case_001", "case_002"]
    assert all(c.image.is_file() and c.label.is_file() for c in index.cases)


def test_msd_missing_label_is_a_named_bad_entry(msd_root):
    missing = msd_root / "labelsTr" / "case_001.nii.gz"
    missing.unlink()
    index = discover(msd_root, fmt="msd")
    assert [c.name for c in index.cases] == ["case_000", "case_002"]
    assert [p.file for p in index.problems] == [str(missing)] and "does not exist" in index.problems[0].message
    with pytest.raises(DataError, match="does not exist") as exc_info:
        load_samples(index)
    assert str(missing) in str(exc_info.value) and "data.on_bad_case=skip" in str(exc_info.value)
    assert [s.name for s in load_samples(index, on_bad_case="skip")] == ["case_000", "case_002"]


def _edit_training(root, edit):
    meta = json.loads((root / "dataset.json").read_text())
    edit(meta["training"])
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda t: t.append(dict(t[0])), "listed again by training entry 3"),
        (lambda t: t.append({"image": t[0]["image"].replace("./", "./../msd/"), "label": t[1]["label"]}), "again"),
        (lambda t: t.append({"image": "../outside.nii.gz"}), "outside the dataset folder"),
        (lambda t: t.append({"image": "/etc/hostname"}), "outside the dataset folder"),
        (lambda t: t.append({"label": "x"}), "has no 'image' path"),
    ],
)
def test_msd_bad_entries_are_left_out_and_named(msd_root, edit, words):
    (msd_root.parent / "outside.nii.gz").write_bytes((msd_root / "imagesTr" / "case_000.nii.gz").read_bytes())
    _edit_training(msd_root, edit)
    index = discover(msd_root)
    assert [c.name for c in index.cases] == ["case_000", "case_001", "case_002"]
    assert len(index.problems) == 1 and words in index.problems[0].message
    with pytest.raises(DataError, match="training entry 3"):
        load_samples(index)


def test_nifti_same_name_twice_is_a_bad_entry(tmp_path):
    save_nii(tmp_path / "images" / "a.nii.gz", volume())
    save_nii(tmp_path / "images" / "a.nii", volume(1))
    save_nii(tmp_path / "images" / "b.nii.gz", volume(2))
    index = discover(tmp_path)
    assert [c.name for c in index.cases] == ["b"]
    assert (
        index.problems[0].file == str(tmp_path / "images" / "a.nii.gz")
        and "same case name" in index.problems[0].message
    )


def test_msd_bad_json_named(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError) as exc_info:
        discover(tmp_path)
    assert str(tmp_path / "dataset.json") in str(exc_info.value)


def test_nifti_images_labels_layout(tmp_path, caplog):
    for name in ("b", "a", "c"):
        save_nii(tmp_path / "images" / f"{name}.nii.gz", volume())
    for name in ("a", "b"):
        save_nii(tmp_path / "labels" / f"{name}.nii.gz", label_map())
    with caplog.at_level(logging.WARNING):
        index = discover(tmp_path)
    assert index.fmt == "nifti" and index.class_names is None and index.spatial_dims == 3
    assert [(c.name, c.label is not None) for c in index.cases] == [("a", True), ("b", True), ("c", False)]
    assert "no label file for 1 of 3" in caplog.text


def test_nifti_flat_layout_with_label_dir(tmp_path):
    save_nii(tmp_path / "scans" / "x.nii", volume())
    save_nii(tmp_path / "scans" / "y.nii.gz", volume())
    save_nii(tmp_path / "masks" / "y.nii.gz", label_map())
    index = discover(tmp_path / "scans", label_dir=tmp_path / "masks")
    assert [(c.name, c.label) for c in index.cases] == [("x", None), ("y", tmp_path / "masks" / "y.nii.gz")]
    assert all(c.label is None for c in discover(tmp_path / "scans", fmt="nifti").cases)


def test_nifti_missing_label_dir_named(tmp_path):
    save_nii(tmp_path / "x.nii.gz", volume())
    with pytest.raises(DataError) as exc_info:
        discover(tmp_path, label_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(exc_info.value)


def test_png_busi_layout_with_extra_masks(tmp_path):
    pixels = np.full((6, 7), 80, np.uint8)
    first, second = np.zeros((6, 7), np.uint8), np.zeros((6, 7), np.uint8)
    first[0, 0], second[5, 6] = 255, 255
    save_png(tmp_path / "benign" / "benign (1).png", pixels)
    save_png(tmp_path / "benign" / "benign (1)_mask.png", first)
    save_png(tmp_path / "benign" / "benign (1)_mask_1.png", second)
    save_png(tmp_path / "normal" / "normal (1).png", pixels)
    save_png(tmp_path / "malignant" / "malignant (2).png", pixels)
    save_png(tmp_path / "malignant" / "malignant (2)_mask.png", second)
    index = discover(tmp_path)
    assert index.fmt == "png" and index.spatial_dims == 2
    names = [c.name for c in index.cases]
    assert names == ["benign/benign (1)", "malignant/malignant (2)", "normal/normal (1)"]
    benign, malignant, normal = index.cases
    assert benign.label.name == "benign (1)_mask.png" and normal.label is None
    merged = read_case_label(benign)
    assert merged.dtype == np.int64 and merged.sum() == 2 and merged[0, 0] == merged[5, 6] == 1
    assert read_case_label(malignant).sum() == 1
    with pytest.raises(DataError):
        read_case_label(normal)


def test_cases_are_sorted_and_deterministic(msd_root):
    meta = json.loads((msd_root / "dataset.json").read_text())
    assert meta["training"][0]["image"].endswith("case_002.nii.gz")  # listed out of order
    assert discover(msd_root) == discover(msd_root)


def _empty(tmp_path):
    (tmp_path / "d").mkdir()
    return tmp_path / "d"


def _no_images(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.txt").write_text("hi")
    return tmp_path / "d"


@pytest.mark.parametrize("make_root", [_empty, _no_images, lambda tmp_path: tmp_path / "absent"])
def test_unusable_folder_named(tmp_path, make_root):
    root = make_root(tmp_path)
    with pytest.raises(DataError) as exc_info:
        discover(root)
    assert str(root) in str(exc_info.value)


def test_unknown_format(msd_root):
    with pytest.raises(DataError, match="unknown dataset format"):
        discover(msd_root, fmt="analyze")
