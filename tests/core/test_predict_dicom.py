"""fedamlp predict on what a hospital holds: a DICOM series in, a DICOM SEG that references it out (or a
NIfTI on request), the result on the scan's own grid; the model carries the plan it was trained on."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from amlp_core.data import make_phantom, write_phantom_dataset
from amlp_core.data.dicom import find_series, read_seg
from amlp_core.engine.artefacts import load_segmentation
from fedamlp.cli import main
from tests.core.test_cli import _yaml
from tests.data.test_geometry import oblique_lps_affine
from tests.dicom_files import write_series

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HIPPOCAMPUS, STUDY = SHARED / "msd_hippocampus", SHARED / "dicom_brain" / "Study1"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny 3D model fine-tuned on 1 mm phantoms (its plan: MR-like, 1 mm, per-case z-score)."""
    tmp = tmp_path_factory.mktemp("model")
    data = write_phantom_dataset(tmp / "data", n=6, shape=(16, 16, 16), seed=0)
    fine = tmp / "fine"
    assert main(["finetune", "--data", str(data), "--config", _yaml(tmp, 3), "--epochs", "1", "--out", str(fine)]) == 0
    return fine


def _scan_series(folder: Path, affine: np.ndarray) -> list[Path]:
    image, _ = make_phantom((24, 20, 10), np.random.default_rng(3))
    return write_series(folder, (image * 100).astype(np.int16), affine, description="phantom")


def test_the_model_carries_its_plan(model):
    _, meta = load_segmentation(model)
    plan = meta["config"]["plan"]
    assert plan["target_spacing"] == [1.0, 1.0, 1.0] and plan["normalization"] == "zscore"
    assert plan["modality"] == "MR"


def test_predict_on_an_oblique_lps_series_writes_a_seg_that_references_it(model, tmp_path):
    _scan_series(tmp_path / "series", oblique_lps_affine())
    (series,), _, _ = find_series(tmp_path / "series")
    out = tmp_path / "seg.dcm"
    assert main(["predict", "--model", str(model), "--input", str(tmp_path / "series"), "--output", str(out)]) == 0
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    assert ds.FrameOfReferenceUID == pydicom.dcmread(series.files[0]).FrameOfReferenceUID
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion"]
    label = read_seg(out, series)
    assert label.shape == series.shape  # on the series' own grid
    # On request, the same result as NIfTI, with the series' shape and geometry.
    nifti = tmp_path / "seg.nii.gz"
    assert main(["predict", "--model", str(model), "--input", str(tmp_path / "series"), "--output", str(nifti)]) == 0
    img = nib.load(nifti)
    assert img.shape == series.shape
    np.testing.assert_allclose(img.affine, series.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), label)


def test_predict_on_an_oblique_nifti_keeps_its_grid(model, tmp_path):
    image, _ = make_phantom((24, 20, 10), np.random.default_rng(4))
    affine = oblique_lps_affine()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--model", str(model), "--input", str(tmp_path / "scan.nii.gz"), "--output", str(out)]) == 0
    assert nib.load(out).shape == (24, 20, 10)
    np.testing.assert_allclose(nib.load(out).affine, affine, atol=1e-5)


def test_predict_refuses_a_seg_output_for_a_nifti_and_a_folder_of_two_series(model, tmp_path, capsys):
    image, _ = make_phantom((16, 16, 16), np.random.default_rng(5))
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "scan.nii.gz")
    assert main(["predict", "--model", str(model), "--input", str(tmp_path / "scan.nii.gz"),
                 "--output", str(tmp_path / "o.dcm")]) == 2  # fmt: skip
    assert "must end in .nii or .nii.gz" in capsys.readouterr().err
    _scan_series(tmp_path / "two", oblique_lps_affine())
    write_series(tmp_path / "two", np.zeros((8, 8, 4), np.int16), np.eye(4), prefix="B")
    assert main(["predict", "--model", str(model), "--input", str(tmp_path / "two"),
                 "--output", str(tmp_path / "o2.dcm")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert str(tmp_path / "two") in err and "Traceback" not in err and not (tmp_path / "o2.dcm").exists()


def test_predict_refuses_a_ct_series_for_an_mr_model(model, tmp_path, capsys):
    image, _ = make_phantom((16, 16, 8), np.random.default_rng(6))
    write_series(tmp_path / "ct", (image * 100).astype(np.int16), np.eye(4), modality="CT")
    out = tmp_path / "o.dcm"
    assert main(["predict", "--model", str(model), "--input", str(tmp_path / "ct"), "--output", str(out)]) == 2
    assert "it is CT, the run's plan is for MR" in capsys.readouterr().err and not out.exists()


@pytest.mark.realdata
@pytest.mark.slow
def test_real_hippocampus_model_segments_the_real_hippocampus_crop_series(tmp_path, capsys):
    """A model fine-tuned on the MSD hippocampus cases, run on the real DICOM study's hippocampus crop."""
    if not HIPPOCAMPUS.is_dir() or not STUDY.is_dir():
        pytest.skip("the hippocampus data or the DICOM study is absent")
    assert main(["data", "check", str(STUDY)]) == 0  # every series of the study is read
    assert capsys.readouterr().out.count("SERIES ") == 5
    fine = tmp_path / "fine"
    settings = [
        "model.num_classes=3",
        "model.img_size=48,64,48",
        "train.finetune_steps=4",
        "train.batch_size=2",
        "data.test_fraction=0.05",
    ]
    args = ["finetune", "--data", str(HIPPOCAMPUS), "--config", _yaml(tmp_path, 3), "--out", str(fine)]
    assert main([*args, *[x for s in settings for x in ("--set", s)]]) == 0
    crop = STUDY / "13_HCropVolume"
    (series,), _, _ = find_series(crop)
    out = tmp_path / "hippocampus_seg.dcm"
    assert main(["predict", "--model", str(fine), "--input", str(crop), "--output", str(out)]) == 0
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    referenced = {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(series.instance_uids)
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Anterior", "Posterior"]
    assert read_seg(out, series).shape == series.shape == (35, 51, 32)


def test_no_output_replaces_what_the_command_reads(model, tmp_path, capsys):
    """Issue 28's class 1: an output that is, or lies in, an input, the model folder or the dataset is
    refused before any work, naming it, and every file stays as it was (links followed)."""
    _scan_series(tmp_path / "series", np.eye(4))
    slices = sorted((tmp_path / "series").iterdir())
    data = Path(yaml_data_path(model))
    (tmp_path / "link.json").symlink_to(model / "checkpoint.pt")
    cases = [
        (["predict", "--model", str(model), "--input", str(tmp_path / "series"), "--output", str(slices[0])], "lies in the input folder"),
        (["predict", "--model", str(model), "--input", str(tmp_path / "series"), "--output", str(model / "seg.nii.gz")], "lies in"),
        (["evaluate", "--model", str(model), "--json", str(model / "checkpoint.pt")], "lies in"),
        (["evaluate", "--model", str(model), "--json", str(tmp_path / "link.json")], "lies in"),
        (["evaluate", "--model", str(model), "--json", str(data / "dataset.json")], "lies in"),
        (["data", "check", str(data), "--json", str(data / "dataset.json")], "lies in"),
    ]  # fmt: skip
    watched = [*slices, model / "checkpoint.pt", data / "dataset.json"]
    before = {p: p.read_bytes() for p in watched}
    for args, words in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and "Traceback" not in err[0], err
    assert {p: p.read_bytes() for p in watched} == before


def yaml_data_path(model: Path) -> str:
    import yaml

    return yaml.safe_load((model / "config.yaml").read_text())["data"]["path"]


def test_predict_a_folder_of_scans_writes_segmentations_quicklooks_and_sizes(tmp_path, capsys):
    """For people: every scan of a folder gets its segmentation, a quick-look picture and its rows of
    sizes.csv, volumes in mL from the voxel spacing (a 2 mm grid: 8 uL a voxel)."""
    import csv as csv_module

    import nibabel as nib

    from amlp_core.data import write_phantom_dataset
    from fedamlp.cli import main

    data = write_phantom_dataset(tmp_path / "data", 8, (16, 16, 16), seed=0)
    tiny = ["model.img_size=16,16,16", "model.embed_dim=48", "model.depth=1", "model.num_heads=2"]
    tiny += ["model.decoder_dim=24", "model.decoder_depth=1", "model.decoder_heads=2", "train.finetune_steps=2"]
    model = tmp_path / "model"
    assert main(["finetune", "--data", str(data), "--out", str(model), *[a for t in tiny for a in ("--set", t)]]) == 0
    scans = tmp_path / "scans"
    scans.mkdir()
    for i, source in enumerate(sorted((data / "imagesTr").iterdir())[:2]):
        image = nib.load(str(source))
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), np.diag([2.0, 2.0, 2.0, 1.0])), str(scans / f"p{i}.nii.gz"))
    (scans / "notes.txt").write_text("not a scan")
    out = tmp_path / "segs"
    assert main(["predict", "--model", str(model), "--input", str(scans), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "p0_quicklook.png", "p0_seg.nii.gz", "p1_quicklook.png", "p1_seg.nii.gz", "sizes.csv",
    ]  # fmt: skip
    rows = list(csv_module.DictReader((out / "sizes.csv").open()))
    assert [(r["case"], r["class"]) for r in rows] == [("p0.nii.gz", "1"), ("p1.nii.gz", "1")]
    for r in rows:
        seg = np.asarray(nib.load(str(out / r["case"].replace(".nii.gz", "_seg.nii.gz"))).dataobj)
        assert int(r["voxels"]) == int((seg == 1).sum())
        assert float(r["volume_ml"]) == pytest.approx(int(r["voxels"]) * 8 / 1000, abs=1e-4)
    from PIL import Image

    assert Image.open(out / "p0_quicklook.png").size == (48, 16)  # three 16 x 16 slices side by side
    # The output may not be the input folder or lie in it, nor in the model.
    for bad in (scans, scans / "segs", model / "segs"):
        assert main(["predict", "--model", str(model), "--input", str(scans), "--output", str(bad)]) == 2
    assert not (scans / "segs").exists() and not (model / "segs").exists()
