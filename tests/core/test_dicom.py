"""DICOM series and SEG: geometry, the series checks, SEG round trips, discovery and the data check.

Every file is a real DICOM file written with pydicom (tests/dicom_files.py); the real-study tests read
../shared/data/dicom_brain/Study1 and skip where it is absent.
"""

import os
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from amlp_core.data import check_dataset, discover, read_case_image, read_case_label
from amlp_core.data.dicom import Series, find_series, orientation, read_seg, read_series, write_seg
from amlp_core.data.validate import Expect, inspect_case
from amlp_core.errors import DataError
from tests.dicom_files import LPS, oblique_affine, random_volume, write_series

STUDY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom_brain" / "Study1"
CLASSES = {0: "background", 1: "tumour", 2: "oedema"}


def only_series(root: Path) -> Series:
    found, _, problems = find_series(root)
    assert [p for p in problems if p.severity == "error"] == []
    assert len(found) == 1
    return found[0]


def errors_of(root: Path) -> list[str]:
    found, _, problems = find_series(root)
    assert found == []
    return [f"{p.file}: {p.message}" for p in problems if p.severity == "error"]


def some_label(shape, seed: int = 0) -> np.ndarray:
    """A label map with classes 1 and 2 in boxes (and background)."""
    label = np.zeros(shape, dtype=np.int64)
    label[2:6, 1:5, 1:4] = 1
    label[7:10, 5:9, 3:7] = 2
    return label


# ---- geometry ----


def test_oblique_anisotropic_series_reads_back_with_its_affine(tmp_path):
    volume, affine = random_volume((12, 10, 8)), oblique_affine((0.8, 0.6, 3.0), 15.0)
    paths = write_series(tmp_path / "s", volume, affine, description="oblique")
    (tmp_path / "s" / "README.md").write_text("not DICOM\n")
    series = only_series(tmp_path)
    assert series.files == tuple(paths)  # sorted along the normal, not by file name
    assert series.shape == (12, 10, 8) and series.modality == "MR" and series.description == "oblique"
    np.testing.assert_allclose(series.spacing, (0.8, 0.6, 3.0), atol=1e-4)
    np.testing.assert_allclose(series.affine, affine, atol=1e-4)
    image, read_affine = read_series(series)
    assert image.dtype == np.float32 and image.shape == (1, 12, 10, 8)
    np.testing.assert_array_equal(image[0], volume)
    np.testing.assert_allclose(read_affine, affine, atol=1e-4)
    assert orientation(read_affine).endswith("oblique")
    # The same voxel lands at the same place as it would in NIfTI: nibabel reads the affine as written.
    nib.save(nib.Nifti1Image(image[0], read_affine), str(tmp_path / "x.nii.gz"))
    np.testing.assert_allclose(nib.load(str(tmp_path / "x.nii.gz")).affine, affine, atol=1e-4)


def test_lps_axis_aligned_series_is_not_oblique(tmp_path):
    affine = LPS @ np.diag([0.5, 0.5, 2.0, 1.0])  # columns to the left, rows to the back: DICOM's usual axial
    write_series(tmp_path / "s", random_volume((6, 5, 4)), affine)
    series = only_series(tmp_path)
    assert orientation(series.affine) == "LPS"
    np.testing.assert_allclose(series.affine, affine, atol=1e-6)


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    volume = random_volume((6, 5, 4))
    write_series(tmp_path / "ct", volume, np.eye(4), modality="CT", rescale=(2.0, -1024.0))
    image, _ = read_series(only_series(tmp_path))
    np.testing.assert_array_equal(image[0], volume.astype(np.float32) * 2 - 1024)


def test_single_slice_is_a_warning_and_uses_the_slice_thickness(tmp_path):
    affine = oblique_affine((0.8, 0.6, 2.5), 10.0)
    write_series(tmp_path / "one", random_volume((6, 5, 1)), affine)
    found, _, problems = find_series(tmp_path)
    assert len(found) == 1 and found[0].shape == (6, 5, 1)
    np.testing.assert_allclose(found[0].affine, affine, atol=1e-4)
    assert [(p.severity, "single slice" in p.message) for p in problems] == [("warning", True)]


def test_too_many_voxels_are_refused_before_reading(tmp_path):
    write_series(tmp_path / "s", random_volume((6, 5, 4)), np.eye(4))
    series = only_series(tmp_path)
    with pytest.raises(DataError, match=r"s: .*120 voxels.*above the limit data.max_voxels=100"):
        read_series(series, max_voxels=100)
    assert read_series(series, max_voxels=120)[0].shape == (1, 6, 5, 4)


def test_undecodable_pixels_name_the_folder(tmp_path):
    paths = write_series(tmp_path / "s", random_volume((6, 5, 4)), np.eye(4))
    series = only_series(tmp_path)
    ds = pydicom.dcmread(paths[2])
    ds.PixelData = ds.PixelData[:10]  # too short for 6 x 5 pixels
    ds.save_as(paths[2])
    with pytest.raises(DataError, match=rf"{tmp_path / 's'}: cannot decode {paths[2].name}"):
        read_series(series)


# ---- the checks ----


def _drop(name):
    def edit(k, ds):
        if k == 2:
            delattr(ds, name)

    return edit


def _set(name, value, slice_index=2):
    def edit(k, ds):
        if k == slice_index:
            setattr(ds, name, value)

    return edit


def test_no_pixel_data_is_found(tmp_path):
    write_series(tmp_path / "bad", random_volume((6, 5, 5)), np.eye(4), edit=_drop("PixelData"))
    write_series(tmp_path / "good", random_volume((6, 5, 5)), np.eye(4))
    found, _, problems = find_series(tmp_path)
    assert [s.folder.name for s in found] == ["good"]  # the good series beside the bad one is kept
    assert [(p.file, "no pixel data in 1 file(s)" in p.message) for p in problems] == [(str(tmp_path / "bad"), True)]


@pytest.mark.parametrize(("drop", "missing"), [((4,), 1), ((4, 5, 6), 3)])
def test_missing_slices_say_where_and_how_many(tmp_path, drop, missing):
    write_series(tmp_path / "gap", random_volume((6, 5, 12)), np.diag([1.0, 1.0, 2.5, 1.0]), drop=drop)
    (message,) = errors_of(tmp_path)
    assert message.startswith(f"{tmp_path / 'gap'}: missing slices: about {missing} slice(s) seem missing")
    assert "2.5 mm" in message and "slices 4 and 5 of" in message


def test_uneven_spacing_is_found(tmp_path):
    def shift(k, ds):  # slice 5 moved by a tenth of a step: steps of 2.75 and 2.25 mm
        if k == 5:
            ds.ImagePositionPatient = [0, 0, 5 * 2.5 + 0.25]

    write_series(tmp_path / "uneven", random_volume((6, 5, 10)), np.diag([1.0, 1.0, 2.5, 1.0]), edit=shift)
    (message,) = errors_of(tmp_path)
    assert message.startswith(f"{tmp_path / 'uneven'}: uneven slice spacing: 2 of 9 steps")


def test_two_series_in_one_folder_are_refused(tmp_path):
    write_series(tmp_path / "mixed", random_volume((6, 5, 4)), np.eye(4), description="T1")
    write_series(tmp_path / "mixed", random_volume((6, 5, 4)), np.eye(4), description="T2", prefix="B")
    write_series(tmp_path / "fine", random_volume((6, 5, 4)), np.eye(4))
    found, _, problems = find_series(tmp_path)
    assert [s.folder.name for s in found] == ["fine"]
    assert [f"{p.file}: {p.message}" for p in problems] == [
        f"{tmp_path / 'mixed'}: holds files of 2 image series (T1, T2); keep one series per folder"
    ]


def test_one_series_over_two_folders_is_refused(tmp_path):
    uid = pydicom.uid.generate_uid()
    write_series(tmp_path / "a", random_volume((6, 5, 4)), np.eye(4), series_uid=uid)
    write_series(tmp_path / "b", random_volume((6, 5, 4)), np.eye(4), series_uid=uid, prefix="B")
    (message,) = errors_of(tmp_path)
    assert message.startswith(f"{tmp_path / 'a'}: files of series {uid} lie in 2 folders")


def test_duplicate_positions_are_found(tmp_path):
    write_series(tmp_path / "dup", random_volume((6, 5, 6)), np.eye(4), edit=_set("ImagePositionPatient", [0, 0, 3]))
    (message,) = errors_of(tmp_path)
    assert message.startswith(f"{tmp_path / 'dup'}: 1 duplicate slice position(s)")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ImageOrientationPatient", [1, 0, 0, 0, 0.9950042, 0.0998334]),
        ("Rows", 6),
        ("Columns", 4),
        ("PixelSpacing", [1, 1.2]),
    ],
)
def test_slices_that_differ_are_found(tmp_path, name, value):
    write_series(tmp_path / "odd", random_volume((6, 5, 5)), np.eye(4), edit=_set(name, value))
    (message,) = errors_of(tmp_path)
    assert message.startswith(f"{tmp_path / 'odd'}: slices differ in {name}: ")


@pytest.mark.parametrize("name", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_is_found(tmp_path, name):
    paths = write_series(tmp_path / "nogeo", random_volume((6, 5, 5)), np.eye(4), edit=_drop(name))
    (message,) = errors_of(tmp_path)
    assert message == f"{tmp_path / 'nogeo'}: {name} missing or invalid in 1 file(s), e.g. {paths[2].name} of 5"


def _every_slice(name, value):
    def edit(k, ds):
        setattr(ds, name, value)

    return edit


@pytest.mark.parametrize(
    "name, value, needle",
    [
        ("ImageOrientationPatient", [2, 0, 0, 0, 2, 0], "is not two orthogonal unit vectors (lengths 2 and 2"),
        ("ImageOrientationPatient", [1, 0, 0, 0.5, 0.866025, 0], "dot product 0.5"),
        ("PixelSpacing", [0, 0], "PixelSpacing [0.0, 0.0] in"),
        ("PixelSpacing", [1, -0.5], "must be positive"),
    ],
)
def test_impossible_geometry_is_refused(tmp_path, name, value, needle):
    write_series(tmp_path / "geo", random_volume((6, 5, 5)), np.eye(4), edit=_every_slice(name, value))
    (message,) = errors_of(tmp_path)
    assert message.startswith(f"{tmp_path / 'geo'}: ") and needle in message, message


def test_a_slice_cut_inside_its_header_refuses_its_series(tmp_path):
    """Cut before the DICM magic, the top slice is not DICOM at all: the series must not read as one slice
    short and OK."""
    paths = write_series(tmp_path / "cut", random_volume((6, 5, 6)), np.eye(4))
    top = paths[-1]
    top.write_bytes(top.read_bytes()[:100])
    (tmp_path / "cut" / "notes.txt").write_text("acquired on the old scanner")  # a note is let be
    (message,) = errors_of(tmp_path)
    assert message.startswith(f"{tmp_path / 'cut'}: 1 file(s) in this series folder do not read as DICOM ({top.name})")


def test_a_slice_without_its_preamble_still_counts(tmp_path):
    """Older writers omit the 128-byte preamble and the DICM magic: such a slice is DICOM all the same."""
    paths = write_series(tmp_path / "old", random_volume((6, 5, 6)), np.eye(4))
    paths[0].write_bytes(paths[0].read_bytes()[132:])
    series = only_series(tmp_path)
    assert series.shape == (6, 5, 6) and paths[0] in series.files


def test_a_fifo_in_a_series_folder_is_named_not_opened(tmp_path):
    write_series(tmp_path / "s", random_volume((6, 5, 4)), np.eye(4))
    fifo = tmp_path / "s" / "pipe"
    os.mkfifo(fifo)
    found, _, problems = find_series(tmp_path)  # would wait forever if it opened the FIFO
    assert [p.message for p in problems if p.file == str(fifo)] == [
        "is a FIFO, not a file; remove it from the data folder"
    ]


def test_data_check_lists_the_series_and_their_problems(tmp_path):
    write_series(tmp_path / "a", random_volume((12, 10, 8)), oblique_affine(), description="T1")
    write_series(tmp_path / "b", random_volume((6, 5, 6)), np.eye(4), drop=(3,))
    write_series(tmp_path / "c", random_volume((6, 5, 1)), np.eye(4))
    report = check_dataset(tmp_path)
    assert report.fmt == "dicom" and report.n_cases == 2 and not report.ok
    lines = report.render().splitlines()
    assert lines[1] == (
        f"SERIES {tmp_path / 'a'}: MR 'T1', 8 slices, 12x10x8 voxels, spacing 0.8 x 0.6 x 3 mm, orientation "
        f"{orientation(oblique_affine())}"
    )
    assert lines[2].startswith(f"SERIES {tmp_path / 'c'}: MR 'test series', 1 slices, 6x5x1 voxels")
    assert lines[2].endswith(", 1 problem(s)")
    assert f"ERROR {tmp_path / 'b'}: missing slices: about 1 slice(s)" in report.render()
    assert f"WARNING {tmp_path / 'c'}: a single slice" in report.render()
    described = report.to_dict()["series"]
    assert [(s["folder"], s["slices"], s["shape"]) for s in described] == [
        (str(tmp_path / "a"), 8, [12, 10, 8]),
        (str(tmp_path / "c"), 1, [6, 5, 1]),
    ]
    assert described[1]["problems"] == ["a single slice: a 2D image, not a volume"]


# ---- SEG ----


def test_seg_round_trip(tmp_path):
    write_series(tmp_path / "s", random_volume((12, 10, 8)), oblique_affine())
    series = only_series(tmp_path)
    label = some_label(series.shape)
    path = write_seg(label, series, CLASSES, tmp_path / "out" / "seg.dcm")
    assert path == tmp_path / "out" / "seg.dcm" and sorted(p.name for p in path.parent.iterdir()) == ["seg.dcm"]
    np.testing.assert_array_equal(read_seg(path, series), label)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in ds.SegmentSequence] == [(1, "tumour"), (2, "oedema")]
    assert ds.SeriesInstanceUID != series.uid and ds.Manufacturer == "fedamlp"
    seg = hd.seg.segread(path)
    assert seg.number_of_segments == 2 and seg.segmentation_type.value == "BINARY"
    # Frame k of the SEG is slice k of the label as DICOM stores pixels: (rows, columns) = label[:, :, k].T.
    sources = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series.files]
    frames = seg.get_pixels_by_source_instance(sources, combine_segments=True)
    np.testing.assert_array_equal(frames, label.transpose(2, 1, 0))


def test_all_background_label_writes_a_valid_seg(tmp_path):
    write_series(tmp_path / "s", random_volume((6, 5, 4)), np.eye(4))
    series = only_series(tmp_path)
    path = write_seg(np.zeros(series.shape, dtype=np.int64), series, {0: "background", 1: "lesion"}, tmp_path / "e.dcm")
    assert int(pydicom.dcmread(path).NumberOfFrames) == 4
    label = read_seg(path, series)
    assert label.dtype == np.int64 and label.shape == (6, 5, 4) and not label.any()


def test_seg_that_omits_empty_frames_reads_as_background_there(tmp_path):
    """SEG files of other tools usually hold frames only for the slices with a segment."""
    from pydicom.sr.codedict import codes

    write_series(tmp_path / "s", random_volume((12, 10, 8)), oblique_affine())
    series = only_series(tmp_path)
    label = some_label(series.shape)
    label[:, :, :2] = 0
    segment = hd.seg.SegmentDescription(1, "lesion", codes.SCT.Tissue, codes.SCT.Tissue, "MANUAL")  # class 1 only
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(p) for p in series.files],
        pixel_array=(label == 1).transpose(2, 1, 0).astype(np.uint8),
        segmentation_type="BINARY",
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=5,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="other",
        manufacturer_model_name="other",
        software_versions="1",
        device_serial_number="1",
    )
    assert seg.NumberOfFrames < series.shape[2]
    seg.save_as(tmp_path / "other.dcm")
    np.testing.assert_array_equal(read_seg(tmp_path / "other.dcm", series), (label == 1).astype(np.int64))


def test_a_failed_write_leaves_the_old_seg_unchanged(tmp_path):
    write_series(tmp_path / "s", random_volume((6, 5, 4)), np.eye(4))
    series = only_series(tmp_path)
    path = write_seg(np.ones(series.shape, dtype=np.int64), series, CLASSES, tmp_path / "seg.dcm")
    before = path.read_bytes()
    with pytest.raises(DataError, match=r"seg.dcm: label shape \(6, 5, 3\) does not match the series \(6, 5, 4\)"):
        write_seg(np.zeros((6, 5, 3), dtype=np.int64), series, CLASSES, path)
    with pytest.raises(DataError, match=r"seg.dcm: label values \[7\] are not classes 0..2"):
        write_seg(np.full(series.shape, 7), series, CLASSES, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "seg.dcm"]  # no temporary file left behind


def test_seg_of_another_series_is_refused(tmp_path):
    write_series(tmp_path / "a", random_volume((6, 5, 4)), np.eye(4))
    write_series(tmp_path / "b", random_volume((6, 5, 4)), np.eye(4))
    a, b = find_series(tmp_path)[0]
    path = write_seg(np.ones(a.shape, dtype=np.int64), a, CLASSES, tmp_path / "seg.dcm")
    with pytest.raises(DataError, match=rf"{path}: does not reference the series {b.uid}"):
        read_seg(path, b)
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 20)
    with pytest.raises(DataError, match=r"junk.dcm: cannot read as DICOM SEG"):
        read_seg(tmp_path / "junk.dcm", a)


def test_discover_finds_the_seg_as_the_case_label(tmp_path):
    root = tmp_path / "study"
    write_series(root / "p1" / "t1", random_volume((12, 10, 8)), oblique_affine())
    series = only_series(root)
    label = some_label(series.shape)
    seg = write_seg(label, series, CLASSES, root / "segs" / "t1_seg.dcm")
    (root / "README.md").write_text("a study\n")
    index = discover(root)
    assert index.fmt == "dicom" and index.spatial_dims == 3 and index.class_names == CLASSES
    assert index.modality == "MR" and [s.uid for s in index.series] == [series.uid]
    (case,) = index.cases
    assert (case.name, case.image, case.label, case.series) == ("p1/t1", series.folder, seg, series.uid)
    sample, problems = inspect_case(case, Expect(3, frozenset(CLASSES)))
    assert problems == [] and sample is not None
    np.testing.assert_array_equal(sample.label, label)
    np.testing.assert_allclose(sample.affine, series.affine)
    np.testing.assert_array_equal(read_case_label(case), label)
    assert check_dataset(root).ok and check_dataset(root).n_labelled == 1


def test_nifti_label_of_a_dicom_case_is_checked_against_the_series_geometry(tmp_path):
    volume, affine = random_volume((12, 10, 8)), oblique_affine()
    write_series(tmp_path / "s1", volume, affine)
    write_series(tmp_path / "s2", volume, affine)
    label = some_label(volume.shape).astype(np.uint8)
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "labels" / "s1.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "labels" / "s2.nii.gz"))  # wrong geometry
    index = discover(tmp_path)  # auto: the NIfTI files in labels/ do not make it a nifti folder
    assert index.fmt == "dicom" and [c.name for c in index.cases] == ["s1", "s2"]
    assert [c.label for c in index.cases] == [tmp_path / "labels" / "s1.nii.gz", tmp_path / "labels" / "s2.nii.gz"]
    image, image_affine = read_case_image(index.cases[0])
    np.testing.assert_array_equal(image[0], volume)
    sample, problems = inspect_case(index.cases[0], Expect(3))
    assert problems == [] and sample is not None
    np.testing.assert_array_equal(sample.label, label)
    sample, problems = inspect_case(index.cases[1], Expect(3))
    assert sample is None and [p.message for p in problems] == [
        "label geometry (affine) differs from its image's: they do not overlay"
    ]


def test_series_directly_in_root_is_named_after_root(tmp_path):
    write_series(tmp_path / "MR1", random_volume((6, 5, 4)), np.eye(4))
    index = discover(tmp_path / "MR1", "dicom")
    assert [(c.name, c.image, c.label) for c in index.cases] == [("MR1", tmp_path / "MR1", None)]
    assert index.class_names is None


# ---- the real study ----


def _study() -> Path:
    if not STUDY.is_dir():
        pytest.skip(f"{STUDY} is absent")
    return STUDY


@pytest.mark.realdata
def test_real_study_series_are_found_with_their_geometry():
    found, segs, problems = find_series(_study())
    assert problems == [] and segs == {}
    assert [s.folder.name for s in found] == [
        "12-T1post-05670",
        "13_HCropVolume",
        "34909-T1prereg-84610",
        "36459-FLAIRreg-76244",
        "37916-T2reg-88910",
    ]
    assert [s.shape for s in found] == [(512, 512, 22), (35, 51, 32), (512, 512, 22), (512, 512, 22), (512, 512, 22)]
    assert [s.description for s in found] == ["T1post", "HippoCrop", "T1pre_reg", "FLAIR_reg", "T2_reg"]
    assert {s.modality for s in found} == {"MR"}
    for s in found:
        if s.description == "HippoCrop":  # 51 rows of 35 columns: the array is [X=35, Y=51, Z=32]
            np.testing.assert_allclose(s.spacing, (1, 1, 1), atol=1e-4)
            assert orientation(s.affine) == "LPS"
        else:  # 5 mm slices every 6.5 mm (SpacingBetweenSlices): the step comes from the positions
            np.testing.assert_allclose(s.spacing, (0.4297, 0.4297, 6.5), atol=1e-3)
            assert orientation(s.affine).endswith(" oblique")
            tilt = np.degrees(np.arccos(abs(s.affine[2, 2]) / np.linalg.norm(s.affine[:3, 2])))
            assert 14 < tilt < 17  # about 15 degrees


@pytest.mark.realdata
def test_real_study_passes_the_data_check():
    report = check_dataset(_study())
    assert report.ok and report.fmt == "dicom" and report.n_cases == 5 and report.n_labelled == 0
    assert len(report.series) == 5 and sum("oblique" in line for line in report.render().splitlines()) == 4


@pytest.mark.realdata
def test_real_hippocampus_crop_reads_and_takes_a_seg(tmp_path):
    (series,) = [s for s in find_series(_study())[0] if s.folder.name == "13_HCropVolume"]
    image, affine = read_series(series)
    assert image.shape == (1, 35, 51, 32) and np.isfinite(image).all() and image.max() > image.min()
    label = (image[0] > np.percentile(image, 90)).astype(np.int64)
    label[:, :, 0] = 0  # an empty slice too
    path = write_seg(label, series, {0: "background", 1: "bright"}, tmp_path / "hippo_seg.dcm")
    np.testing.assert_array_equal(read_seg(path, series), label)
    assert pydicom.dcmread(path, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
